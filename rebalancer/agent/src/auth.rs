//! Peer authentication with munge: the hello carries a credential whose payload names the
//! sending node; the receiver decodes it with `unmunge` and requires uid 0 and a matching node.

use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::config::AuthMethod;
use crate::error::AgentError;

const PAYLOAD_PREFIX: &str = "rebalancer-agent node=";

pub async fn credential(
    method: AuthMethod,
    socket: Option<&Path>,
    node: &str,
) -> Result<Option<String>, AgentError> {
    if method == AuthMethod::None {
        return Ok(None);
    }
    let mut cmd = tokio::process::Command::new("munge");
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    cmd.arg("--string").arg(format!("{PAYLOAD_PREFIX}{node}"));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| AgentError::Io {
            what: "cannot run munge".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(AgentError::Internal(format!(
            "munge could not create a credential: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(Some(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// Parses `unmunge` output into (uid, payload).
pub fn parse_unmunge(out: &str) -> Option<(u32, String)> {
    let mut uid = None;
    let mut payload = String::new();
    let mut in_payload = false;
    for line in out.lines() {
        if in_payload {
            payload.push_str(line);
            continue;
        }
        if let Some(v) = line.strip_prefix("UID:") {
            // "UID:              root (0)"
            uid = v
                .rsplit_once('(')
                .and_then(|(_, n)| n.trim_end_matches(')').trim().parse().ok());
        } else if line.is_empty() {
            in_payload = true;
        }
    }
    Some((uid?, payload.trim().to_string()))
}

/// Verifies a peer's credential; returns the node name it proves.
pub async fn verify(
    method: AuthMethod,
    socket: Option<&Path>,
    claimed_node: Option<&str>,
    cred: Option<&str>,
) -> Result<(), AgentError> {
    if method == AuthMethod::None {
        return Ok(());
    }
    let cred =
        cred.ok_or_else(|| AgentError::PermissionDenied("peer sent no munge credential".into()))?;
    let mut cmd = tokio::process::Command::new("unmunge");
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| AgentError::Io {
            what: "cannot run unmunge".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(cred.as_bytes())
            .await
            .map_err(|source| AgentError::Io {
                what: "write to unmunge".into(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| AgentError::Io {
            what: "wait for unmunge".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(AgentError::PermissionDenied(format!(
            "invalid munge credential: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let (uid, payload) = parse_unmunge(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| AgentError::PermissionDenied("unreadable munge credential".into()))?;
    if uid != 0 {
        return Err(AgentError::PermissionDenied(format!(
            "credential of uid {uid}, agents run as root"
        )));
    }
    let node = payload.strip_prefix(PAYLOAD_PREFIX).ok_or_else(|| {
        AgentError::PermissionDenied("credential is not an agent credential".into())
    })?;
    if let Some(c) = claimed_node {
        if c != node {
            return Err(AgentError::PermissionDenied(format!(
                "credential is for node {node}, hello claims {c}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmunge_output_parses() {
        let out = "STATUS:          Success (0)\nENCODE_HOST:     h (127.0.0.1)\nUID:             root (0)\nGID:             root (0)\nLENGTH:          27\n\nrebalancer-agent node=n1\n";
        assert_eq!(
            parse_unmunge(out),
            Some((0, "rebalancer-agent node=n1".into()))
        );
        assert_eq!(parse_unmunge("STATUS: Success (0)\n"), None);
    }
}
