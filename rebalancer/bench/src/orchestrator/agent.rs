//! Toolchain (a): the project's node agent. Two agents run in the two node namespaces; a
//! `Request::Migrate` on the source agent's control socket moves the workload.

use crate::sys::{Result, SysError};
use crate::{Ctx, Mode};
use rebalancer_bench::report::Row;

pub fn run(ctx: &Ctx, _mode: Mode, _mib: u64, _idx: usize, _row: &mut Row) -> Result<()> {
    let bin = ctx.agent_bin.clone().unwrap_or_default();
    if !bin.exists() {
        return Err(SysError::Other(format!("{} not built", bin.display())));
    }
    Err(SysError::Other("agent integration pending".into()))
}

pub fn cleanup(_ctx: &Ctx) {}
