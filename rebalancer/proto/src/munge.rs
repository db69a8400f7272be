//! Runs `munge` and `unmunge` for [`crate::auth`]'s bound credentials (tokio).
//!
//! Every run is bounded in time and killed on drop, and at most [`MAX_CONCURRENT`] run at once
//! per process: a flood of connections gets a clear refusal instead of a fork storm.

use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::auth::{parse_unmunge, AuthError, Binding, Expect, MAX_CREDENTIAL_LEN};

/// Longest a munge or unmunge run may take (munged answers in milliseconds).
const RUN_TIMEOUT: Duration = Duration::from_secs(5);
/// How many munge/unmunge processes may run at once.
pub const MAX_CONCURRENT: usize = 8;
/// How long a run waits for a free slot before it is refused.
const SLOT_WAIT: Duration = Duration::from_secs(2);

fn slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| Semaphore::new(MAX_CONCURRENT))
}

async fn run(
    program: &'static str,
    socket: Option<&Path>,
    input: &[u8],
) -> Result<std::process::Output, AuthError> {
    let _slot = tokio::time::timeout(SLOT_WAIT, slots().acquire())
        .await
        .map_err(|_| AuthError::Busy(MAX_CONCURRENT))?
        .map_err(|_| AuthError::Munge("credential check slots closed".into()))?;
    let mut cmd = tokio::process::Command::new(program);
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| AuthError::Munge(format!("cannot run {program}: {e}")))?;
    let work = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input)
                .await
                .map_err(|e| AuthError::Munge(format!("write to {program}: {e}")))?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| AuthError::Munge(format!("wait for {program}: {e}")))
    };
    tokio::time::timeout(RUN_TIMEOUT, work)
        .await
        .map_err(|_| AuthError::Timeout {
            program,
            ms: RUN_TIMEOUT.as_millis(),
        })?
}

/// A munge credential for `binding` (munged at `socket`, else the default one).
pub async fn bound_credential(
    socket: Option<&Path>,
    binding: &Binding,
) -> Result<String, AuthError> {
    credential(socket, &binding.payload()?).await
}

/// A munge credential whose payload is `payload` as given (the agent's version-1 peer hello;
/// bound credentials go through [`bound_credential`]).
pub async fn credential(socket: Option<&Path>, payload: &str) -> Result<String, AuthError> {
    let out = run("munge", socket, payload.as_bytes()).await?;
    if !out.status.success() {
        return Err(AuthError::Munge(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Decodes a credential (munge checks key, lifetime and replay): (uid, payload).
pub async fn decode(socket: Option<&Path>, cred: Option<&str>) -> Result<(u32, String), AuthError> {
    let cred = cred.ok_or(AuthError::Missing)?;
    if cred.len() > MAX_CREDENTIAL_LEN {
        return Err(AuthError::TooLong { len: cred.len() });
    }
    let out = run("unmunge", socket, cred.as_bytes()).await?;
    if !out.status.success() {
        return Err(AuthError::Invalid(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    parse_unmunge(&String::from_utf8_lossy(&out.stdout)).ok_or(AuthError::Unreadable)
}

/// Decodes `cred` and checks it against `expect`; returns the sender it proves.
pub async fn verify(
    socket: Option<&Path>,
    cred: Option<&str>,
    expect: &Expect<'_>,
) -> Result<String, AuthError> {
    let (uid, payload) = decode(socket, cred).await?;
    expect.check(uid, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_or_oversized_credential_is_refused_before_unmunge_runs() {
        // The socket does not exist: reaching unmunge would fail otherwise.
        let sock = Some(Path::new("/nonexistent/munge.sock"));
        assert_eq!(decode(sock, None).await, Err(AuthError::Missing));
        let long = "M".repeat(MAX_CREDENTIAL_LEN + 1);
        assert_eq!(
            decode(sock, Some(&long)).await,
            Err(AuthError::TooLong {
                len: MAX_CREDENTIAL_LEN + 1
            })
        );
    }
}
