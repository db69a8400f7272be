//! The simulated peer connection: the source's end of an in-memory pipe to the destination's
//! real server, broken, delayed or stalled where a [`Fault`] says.

use super::*;

/// The source's end of a simulated connection; breaks where a [`Fault`] says.
pub struct SimLink {
    conn: Option<PeerConn<DuplexStream>>,
    host: SimHost,
    /// Bytes sent before the connection broke (a count never goes back).
    sent: u64,
    /// A request held back by [`Fault::LinkLate`], sent before the next one.
    late: Option<PeerRequest>,
    /// The request a watched call waits for (its faults strike on the answer).
    pending: Option<&'static str>,
}

/// Clears [`SimState::stalled`] when the stalled call is dropped.
struct Unstall(SimHost);

impl Drop for Unstall {
    fn drop(&mut self) {
        self.0.state().stalled = false;
    }
}

impl SimLink {
    fn broken() -> AgentError {
        AgentError::Unreachable("simulated link failure".into())
    }

    fn before(&mut self, op: &'static str) -> Result<&mut PeerConn<DuplexStream>, AgentError> {
        if self.host.take_fault(|f| *f == Fault::LinkBefore(op)) || self.host.is_partitioned() {
            // Hanging up: the destination sees EOF.
            self.sent = self.bytes_sent();
            self.conn = None;
        }
        self.conn.as_mut().ok_or_else(Self::broken)
    }

    async fn after<T>(
        &mut self,
        op: &'static str,
        r: Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        self.sent = self.bytes_sent();
        if self.host.take_fault(|f| *f == Fault::LinkAfter(op)) {
            self.conn = None;
            return Err(Self::broken());
        }
        if self.host.take_fault(|f| *f == Fault::PartitionAfter(op)) {
            self.host
                .state()
                .log
                .push(format!("partitioned after {op}"));
            self.host.partition(true);
            self.conn = None;
            return Err(Self::broken());
        }
        if self.host.take_fault(|f| *f == Fault::LinkStall(op)) {
            self.stall(op, "answer stalled").await;
        }
        r
    }

    /// Waits until the caller's timer drops this call.
    async fn stall(&mut self, op: &'static str, what: &str) {
        {
            let mut s = self.host.state();
            s.log.push(format!("{op}: {what}"));
            s.stalled = true;
        }
        let _unstall = Unstall(self.host.clone());
        std::future::pending::<()>().await;
    }
}

impl PeerLink for SimLink {
    async fn call(&mut self, req: &PeerRequest) -> Result<PeerReply, AgentError> {
        let op = req.op();
        if self.host.is_silent() {
            self.stall(op, "not delivered (link silent)").await;
        }
        if let Some(late) = self.late.take() {
            if let Some(c) = self.conn.as_mut() {
                let r = c.call(&late).await;
                self.host.state().log.push(format!(
                    "{} delivered late: {}",
                    late.op(),
                    match &r {
                        Ok(_) => "accepted".to_string(),
                        Err(e) => format!("refused ({})", e.chain()),
                    }
                ));
            }
        }
        if self.host.take_fault(|f| *f == Fault::LinkLate(op)) {
            self.late = Some(req.clone());
            self.stall(op, "held back").await;
        }
        let r = self.before(op)?.call(req).await;
        self.after(op, r).await
    }
    async fn send_images(&mut self, dir: &Path) -> Result<u64, AgentError> {
        if self.host.silence_at("images") {
            self.stall("images", "not delivered (link silent)").await;
        }
        let r = self.before("images")?.send_images(dir).await;
        self.after("images", r).await
    }
    fn bytes_sent(&self) -> u64 {
        self.conn.as_ref().map_or(self.sent, |c| c.bytes_sent)
    }
    fn proven_node(&self) -> Option<&str> {
        self.conn.as_ref().and_then(|c| c.peer_node.as_deref())
    }
    async fn beat(&mut self, phase: &str, bytes: u64) -> Result<(), AgentError> {
        if self.host.is_silent() {
            // Dropped on the way: the destination hears nothing.
            return Ok(());
        }
        let c = self.before("heartbeat")?;
        c.beat(phase, bytes).await
    }
    async fn heard(&mut self) -> Result<(), AgentError> {
        if self.host.is_silent() {
            std::future::pending::<()>().await;
        }
        let c = self.conn.as_mut().ok_or_else(Self::broken)?;
        c.heard().await
    }
    async fn send_req(&mut self, req: &PeerRequest) -> Result<u32, AgentError> {
        let op = req.op();
        if let Some(late) = self.late.take() {
            if let Some(c) = self.conn.as_mut() {
                let r = c.call(&late).await;
                self.host.state().log.push(format!(
                    "{} delivered late: {}",
                    late.op(),
                    match &r {
                        Ok(_) => "accepted".to_string(),
                        Err(e) => format!("refused ({})", e.chain()),
                    }
                ));
            }
        }
        if self.host.take_fault(|f| *f == Fault::LinkLate(op)) {
            self.late = Some(req.clone());
            self.stall(op, "held back").await;
        }
        self.pending = Some(op);
        if self.host.silence_at(op) {
            // Not delivered; the answer never comes.
            return Ok(u32::MAX);
        }
        self.before(op)?.send_req(req).await
    }
    async fn next_of(&mut self, id: u32) -> Result<Option<PeerReply>, AgentError> {
        if self.host.is_silent() {
            std::future::pending::<()>().await;
        }
        let op = self.pending.unwrap_or("request");
        let c = self.conn.as_mut().ok_or_else(Self::broken)?;
        match c.next_of(id).await {
            Ok(None) => Ok(None),
            Ok(Some(r)) => self.after(op, Ok(r)).await.map(Some),
            Err(e) => self.after(op, Err(e)).await,
        }
    }
    fn version(&self) -> u16 {
        self.conn.as_ref().map_or(0, |c| c.version)
    }
}

impl Connector for SimHost {
    type Link = SimLink;
    async fn connect(
        &self,
        cfg: &AgentConfig,
        _addr: SocketAddr,
        timeout: Duration,
    ) -> Result<SimLink, AgentError> {
        self.act("connect").map_err(|_| {
            AgentError::Unreachable("simulated: no route to the destination".into())
        })?;
        if self.is_partitioned() {
            self.state().log.push("connect (partitioned)".into());
            return Err(AgentError::Unreachable(
                "simulated: partitioned from the destination".into(),
            ));
        }
        let (agent, host) = self
            .0
            .peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| AgentError::Unreachable("simulated: no destination".into()))?;
        let (a, b) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn(crate::migration::destination::serve_with(
            Arc::new(host.clone()),
            agent,
            b,
            None,
        ));
        host.0
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(served);
        let conn = PeerConn::handshake(cfg, a, timeout).await?;
        Ok(SimLink {
            conn: Some(conn),
            host: self.clone(),
            sent: 0,
            late: None,
            pending: None,
        })
    }
}
