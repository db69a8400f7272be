//! sbatch and salloc (allocator context): the options travel with the job to the batch step's
//! slurmstepd and to the steps started inside the allocation (Slurm passes them on in the
//! environment), so only the values are checked here, by the option callbacks.

use crate::ffi::{self, Spank};
use crate::state::{config_or_complain, state};

pub fn init_post_opt(_sp: Spank) -> libc::c_int {
    let opts = state().opts.clone();
    if opts.restore.is_some() {
        ffi::log_error("rebalancer: --rebalancer-restore applies to srun steps only");
        return -1;
    }
    if (opts.migratable.is_some() || opts.mode.is_some())
        && config_or_complain("--migratable").is_none()
    {
        return -1;
    }
    0
}
