//! Connection to the controller's control socket.

use std::path::Path;

use rebalancer_proto::channel::{AsyncChannel, ChannelConfig};
use rebalancer_proto::control::{ControlReply, ControlRequest, ControlResponse};
use rebalancer_proto::{ErrorCode, ErrorReply, Event, Hello, ProtoError, Role};
use tokio::net::UnixStream;

pub const SOFTWARE: &str = concat!("rebalctl ", env!("CARGO_PKG_VERSION"));

pub struct Client {
    ch: AsyncChannel<UnixStream>,
}

fn local(code: ErrorCode, message: String) -> ErrorReply {
    ErrorReply { code, message }
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ErrorReply> {
        let s = UnixStream::connect(path).await.map_err(|e| {
            local(
                ErrorCode::Unreachable,
                format!(
                    "cannot reach rebalancerd at {}: {e} (is it running? see --socket)",
                    path.display()
                ),
            )
        })?;
        // A watched migration or evacuation may run for as long as the operator waits; the
        // user interrupts rebalctl rather than a timer.
        let cfg = ChannelConfig::default()
            .idle_timeout(None)
            .call_timeout(None);
        let ch = AsyncChannel::connect(s, cfg, Hello::new(Role::Cli, SOFTWARE))
            .await
            .map_err(proto)?;
        Ok(Client { ch })
    }

    /// Sends a request; events with its id go to `on_event` until the response arrives.
    pub async fn call(
        &mut self,
        req: &ControlRequest,
        on_event: impl FnMut(Event),
    ) -> Result<ControlReply, ErrorReply> {
        let r: ControlResponse = self
            .ch
            .call_with(req, None, on_event)
            .await
            .map_err(proto)?;
        r.into_result()
    }
}

fn proto(e: ProtoError) -> ErrorReply {
    match e {
        // The controller's own answer (e.g. to a Hello it refused) reaches the user as is.
        ProtoError::Refused(r) => r,
        other => {
            let code = match other {
                ProtoError::Version { .. } | ProtoError::NoCommonVersion { .. } => {
                    ErrorCode::Version
                }
                ProtoError::Closed | ProtoError::Truncated | ProtoError::Io(_) => {
                    ErrorCode::Unreachable
                }
                ProtoError::Timeout { .. } => ErrorCode::Timeout,
                _ => ErrorCode::Internal,
            };
            local(code, format!("talking to rebalancerd: {other}"))
        }
    }
}
