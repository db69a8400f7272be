//! The exported SPANK callbacks: each one catches panics, then hands over to the file of the
//! context it runs in. Plugin state lives in [`crate::state`].

use std::ffi::{c_char, c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::config::{Config, OptId};
use crate::ffi::{self, sys, Context, Spank};
use crate::state::state;
use crate::{allocator, local, remote};

/// Runs a callback body; a panic becomes an error return instead of unwinding into C.
fn guard(name: &str, f: impl FnOnce() -> c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(rc) => rc,
        Err(_) => {
            ffi::log_error(&format!("rebalancer: internal error (panic) in {name}"));
            -1
        }
    }
}

/// Options, registered with `spank_option_register` in every context that parses them
/// (local, remote, allocator), as spank.h requires for allocator-context options.
fn options() -> [(
    &'static CStr,
    Option<&'static CStr>,
    &'static CStr,
    c_int,
    OptId,
); 4] {
    [
        (
            c"migratable",
            Some(c"CLASS"),
            c"Run the tasks in containers the rebalancer may live-migrate; the optional CLASS picks a policy class",
            2,
            OptId::Migratable,
        ),
        (
            c"migration-mode",
            Some(c"MODE"),
            c"How to migrate this job: stop-and-copy, post-copy or auto (implies --migratable)",
            1,
            OptId::Mode,
        ),
        (
            c"no-migrate",
            None,
            c"Never migrate this job (where the site makes jobs migratable by default)",
            0,
            OptId::NoMigrate,
        ),
        (
            c"rebalancer-restore",
            Some(c"ID"),
            c"(internal, used by the rebalancer) restore migration ID as this step's task",
            1,
            OptId::Restore,
        ),
    ]
}

fn register_options(sp: Spank) -> Result<(), String> {
    for (name, arginfo, usage, has_arg, id) in options() {
        let opt = Box::leak(Box::new(sys::spank_option {
            name: name.as_ptr() as *mut c_char,
            arginfo: arginfo.map_or(std::ptr::null_mut(), |a| a.as_ptr() as *mut c_char),
            usage: usage.as_ptr() as *mut c_char,
            has_arg,
            val: id as c_int,
            cb: Some(option_cb),
        }));
        sp.register_option(opt)
            .map_err(|e| format!("cannot register --{}: {e}", name.to_string_lossy()))?;
    }
    Ok(())
}

extern "C" fn option_cb(val: c_int, optarg: *const c_char, remote: c_int) -> c_int {
    guard("option callback", || {
        let Some(id) = OptId::from_val(val) else {
            return -1;
        };
        let arg = if optarg.is_null() {
            None
        } else {
            // SAFETY: Slurm passes a NUL-terminated option argument or null.
            Some(
                unsafe { CStr::from_ptr(optarg) }
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        let mut st = state();
        match st.opts.apply(id, arg.as_deref()) {
            Ok(()) => 0,
            Err(e) => {
                let name = options()
                    .iter()
                    .find(|o| o.4 == id)
                    .map(|o| o.0.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let where_ = if remote != 0 { " (on the node)" } else { "" };
                ffi::log_error(&format!("rebalancer: --{name}{where_}: {e}"));
                -1
            }
        }
    })
}

/// Shared by every context: register options, then read plugstack.conf's arguments.
fn init(sp: Spank, args: Vec<String>) -> c_int {
    let ctx = ffi::context();
    if matches!(
        ctx,
        Context::S_CTX_LOCAL | Context::S_CTX_REMOTE | Context::S_CTX_ALLOCATOR
    ) {
        if let Err(e) = register_options(sp) {
            ffi::log_error(&format!("rebalancer: {e}"));
            return -1;
        }
    }
    let parsed = Config::parse(&args);
    let rc = match &parsed {
        Ok(_) => 0,
        Err(e) => {
            ffi::log_error(&format!(
                "rebalancer: bad plugstack.conf arguments: {e}; --migratable cannot work until an administrator fixes them"
            ));
            -1
        }
    };
    state().config = Some(parsed);
    rc
}

macro_rules! callback {
    ($name:ident, $body:expr) => {
        /// SPANK callback (see spank.h).
        ///
        /// # Safety
        /// Called by Slurm with a valid handle and `argc` plugin arguments in `argv`.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            sp: sys::spank_t,
            argc: c_int,
            argv: *mut *mut c_char,
        ) -> c_int {
            guard(stringify!($name), || {
                // SAFETY: the handle and arguments come from Slurm for this call.
                let (sp, args) = unsafe { (Spank::from_raw(sp), ffi::args(argc, argv)) };
                let f: fn(Spank, Vec<String>) -> c_int = $body;
                f(sp, args)
            })
        }
    };
}

callback!(slurm_spank_init, init);

callback!(slurm_spank_init_post_opt, |sp, _| match ffi::context() {
    Context::S_CTX_LOCAL => local::init_post_opt(sp),
    Context::S_CTX_ALLOCATOR => allocator::init_post_opt(sp),
    Context::S_CTX_REMOTE => remote::init_post_opt(sp),
    _ => 0,
});

callback!(slurm_spank_local_user_init, |sp, _| local::user_init(sp));

callback!(slurm_spank_user_init, |sp, _| remote::user_init(sp));

callback!(slurm_spank_task_init_privileged, |sp, _| {
    remote::task_init_privileged(sp)
});

callback!(slurm_spank_task_init, |sp, _| remote::task_init(sp));

callback!(slurm_spank_task_exit, |_, _| 0);

callback!(slurm_spank_exit, |sp, _| match ffi::context() {
    Context::S_CTX_LOCAL => local::exit(sp),
    _ => 0,
});
