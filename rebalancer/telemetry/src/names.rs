//! Metric names, as exported and as referenced by the shipped dashboard and alerting rules
//! (deploy/monitoring/), so each daemon's tests can check that what the dashboards query exists.

use std::collections::BTreeSet;
use std::path::Path;

/// Sample names in an OpenMetrics/Prometheus text exposition (`foo_bucket`, `foo_total`, ...).
pub fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every `prefix…` identifier in `text` (a PromQL expression, a dashboard, a rules file).
pub fn referenced(text: &str, prefix: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let starts_word = rest[..at].chars().next_back().is_none_or(|c| !is_ident(c));
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        // A name ending in `_` is prose about a namespace (`rebalancer_agent_*`), not a metric.
        if starts_word && !tail[..end].ends_with('_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

/// The shipped monitoring files (dashboard JSON, rules and their unit tests), as one text each.
pub fn monitoring_files(repo: &Path) -> std::io::Result<Vec<(String, String)>> {
    let dir = repo.join("deploy/monitoring");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let path = e?.path();
        if matches!(
            path.extension().and_then(|x| x.to_str()),
            Some("json" | "yml" | "yaml")
        ) {
            let text = std::fs::read_to_string(&path)?;
            files.push((path.display().to_string(), text));
        }
    }
    files.sort();
    Ok(files)
}

/// Names under `prefix` that the monitoring files reference but `exported` lacks, with the file
/// naming each. `except` excludes another daemon's namespace nested under the same prefix.
pub fn missing(
    files: &[(String, String)],
    exported: &BTreeSet<String>,
    prefix: &str,
    except: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, text) in files {
        for name in referenced(text, prefix) {
            if except.is_some_and(|x| name.starts_with(x)) || exported.contains(&name) {
                continue;
            }
            out.push(format!("{path}: {name}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_names_are_sample_names() {
        let text =
            "# HELP a_total x\n# TYPE a counter\na_total 1\nb_bucket{le=\"0.1\"} 0\nc 2\n# EOF\n";
        let n = exported(text);
        assert_eq!(
            n.into_iter().collect::<Vec<_>>(),
            ["a_total", "b_bucket", "c"]
        );
    }

    #[test]
    fn references_are_whole_identifiers() {
        let q = r#"sum(rate(rebalancer_migrations_total{outcome="failed"}[5m])) / x_rebalancer_y + rebalancer_agent_up # rebalancer_*"#;
        let r = referenced(q, "rebalancer_");
        assert_eq!(
            r.into_iter().collect::<Vec<_>>(),
            ["rebalancer_agent_up", "rebalancer_migrations_total"]
        );
    }

    #[test]
    fn missing_names_the_file_and_skips_the_other_namespace() {
        let files = vec![(
            "d.json".to_string(),
            "rebalancer_a_total rebalancer_agent_b rebalancer_gone".to_string(),
        )];
        let exp: BTreeSet<String> = ["rebalancer_a_total".to_string()].into();
        assert_eq!(
            missing(&files, &exp, "rebalancer_", Some("rebalancer_agent_")),
            ["d.json: rebalancer_gone"]
        );
    }
}
