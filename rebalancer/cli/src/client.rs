//! Connection to the controller's control socket.

use std::path::Path;

use rebalancer_proto::control::{ControlReply, ControlRequest, ControlResponse};
use rebalancer_proto::frame::{read_frame_async, write_frame_async, Frame, FrameKind};
use rebalancer_proto::{ErrorCode, ErrorReply, Event, Hello, Role, MAX_FRAME_LEN};
use tokio::net::UnixStream;

pub const SOFTWARE: &str = concat!("rebalctl ", env!("CARGO_PKG_VERSION"));

pub struct Client {
    s: UnixStream,
    next: u32,
}

fn local(code: ErrorCode, message: String) -> ErrorReply {
    ErrorReply { code, message }
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ErrorReply> {
        let mut s = UnixStream::connect(path).await.map_err(|e| {
            local(
                ErrorCode::Unreachable,
                format!(
                    "cannot reach rebalancerd at {}: {e} (is it running? see --socket)",
                    path.display()
                ),
            )
        })?;
        let hello = Frame::json(FrameKind::Hello, 0, &Hello::new(Role::Cli, SOFTWARE))
            .map_err(|e| local(ErrorCode::Internal, e.to_string()))?;
        write_frame_async(&mut s, &hello).await.map_err(proto)?;
        let f = read_frame_async(&mut s, MAX_FRAME_LEN)
            .await
            .map_err(proto)?;
        match f.header.kind {
            FrameKind::Hello => Ok(Client { s, next: 0 }),
            _ => match f.decode::<ControlResponse>(FrameKind::Response, "response") {
                Ok(ControlResponse::Error(e)) => Err(e),
                _ => Err(local(
                    ErrorCode::Internal,
                    "the controller did not answer the hello".into(),
                )),
            },
        }
    }

    /// Sends a request; events with its id go to `on_event` until the response arrives.
    pub async fn call(
        &mut self,
        req: &ControlRequest,
        mut on_event: impl FnMut(Event),
    ) -> Result<ControlReply, ErrorReply> {
        self.next += 1;
        let id = self.next;
        let f = Frame::json(FrameKind::Request, id, req)
            .map_err(|e| local(ErrorCode::Internal, e.to_string()))?;
        write_frame_async(&mut self.s, &f).await.map_err(proto)?;
        loop {
            let f = read_frame_async(&mut self.s, MAX_FRAME_LEN)
                .await
                .map_err(proto)?;
            if f.header.id != id {
                continue;
            }
            match f.header.kind {
                FrameKind::Event => {
                    if let Ok(ev) = f.decode::<Event>(FrameKind::Event, "event") {
                        on_event(ev);
                    }
                }
                _ => {
                    let r: ControlResponse =
                        f.decode(FrameKind::Response, "response").map_err(proto)?;
                    return r.into_result();
                }
            }
        }
    }
}

fn proto(e: rebalancer_proto::ProtoError) -> ErrorReply {
    let code = match e {
        rebalancer_proto::ProtoError::Version { .. } => ErrorCode::Version,
        rebalancer_proto::ProtoError::Closed | rebalancer_proto::ProtoError::Io(_) => {
            ErrorCode::Unreachable
        }
        _ => ErrorCode::Internal,
    };
    local(code, format!("talking to rebalancerd: {e}"))
}
