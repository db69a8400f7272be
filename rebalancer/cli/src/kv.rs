//! scontrol-style `key=value` words, and the values every command shares.

/// Splits `key=value` words; keys are case-insensitive (`JobId=5` is `jobid=5`). Each key may
/// appear once and must be one of `allowed` (aliases map to their first spelling).
pub fn parse_kv(
    words: &[String],
    allowed: &[&[&'static str]],
) -> Result<Vec<(&'static str, String)>, String> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("'{w}' is not KEY=VALUE"))?;
        let key = k.to_ascii_lowercase();
        let canon = allowed
            .iter()
            .find(|names| names.iter().any(|n| *n == key))
            .map(|names| names[0])
            .ok_or_else(|| {
                let names: Vec<&str> = allowed.iter().map(|n| n[0]).collect();
                format!("unknown key '{k}' (expected {})", names.join(", "))
            })?;
        if v.is_empty() {
            return Err(format!("{canon}= needs a value"));
        }
        if out.iter().any(|(c, _)| *c == canon) {
            return Err(format!("{canon}= given twice"));
        }
        out.push((canon, v.to_string()));
    }
    Ok(out)
}

pub fn get<'a>(kv: &'a [(&'static str, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
}

pub fn parse_job(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|j| *j > 0)
        .ok_or_else(|| format!("job '{v}' is not a job id"))
}
