//! srun (local context): options were checked by their callbacks as srun parsed them; here the
//! step as a whole is checked before it is launched.

use crate::ffi::{self, Spank};
use crate::state::{config_or_complain, state};

/// Set by the agent in the environment of the restore steps it starts.
pub const RESTORE_BY_AGENT_ENV: &str = "SLURM_REBALANCER_AGENT_RESTORE";

pub fn init_post_opt(_sp: Spank) -> libc::c_int {
    let opts = state().opts.clone();
    if opts.restore.is_some() {
        // The agent runs the restore step's srun as the job's user (srun has no --uid after
        // 22.05) and marks it. This only keeps users from running the option by mistake: the
        // agent's prepare-restore is the gate (the migration must restore a task of this job).
        let by_agent = std::env::var_os(RESTORE_BY_AGENT_ENV).is_some();
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 && !by_agent {
            ffi::log_error(
                "rebalancer: --rebalancer-restore is used by the rebalancer itself (root only)",
            );
            return -1;
        }
        return 0;
    }
    let asked = opts.migratable.is_some() || opts.mode.is_some();
    if asked && config_or_complain("--migratable").is_none() {
        return -1;
    }
    // Checked here, before srun creates the step, where the command line is known (a step that
    // is refused later, in user_init, holds its CPUs for a while after srun left).
    let wants = state()
        .config
        .clone()
        .and_then(Result::ok)
        .is_some_and(|cfg| opts.wants_container(&cfg));
    if wants {
        let args = own_cmdline();
        if refuse_input(input_option(leading_options(&args))) {
            return -1;
        }
    }
    0
}

/// Logs the refusal of `--input=VALUE`, or of srun's own stdin, if a migratable task cannot
/// have it; true if refused.
fn refuse_input(input: Option<String>) -> bool {
    let input = input.or_else(|| std::env::var("SLURM_STDINMODE").ok());
    if let Some(input) = &input {
        if let Some(why) = stdin_cannot_follow(input) {
            ffi::log_error(&format!(
                "rebalancer: --migratable cannot be used with --input={input}: {why}; drop \
                 --migratable, or let the program open its input file itself"
            ));
            return true;
        }
    }
    let Some(what) = srun_stdin_cannot_follow(input.as_deref(), SrunStdin::of_fd0()) else {
        return false;
    };
    ffi::log_error(&format!(
        "rebalancer: --migratable cannot forward srun's stdin ({what}): a task that moves to \
         another node would stop receiving it; use --input=none (srun forwards nothing), \
         run srun with </dev/null, or drop --migratable"
    ));
    true
}

/// What srun's own standard input is: the stdin it would forward to the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrunStdin {
    Closed,
    DevNull,
    Terminal,
    Pipe,
    Socket,
    File,
    Other,
}

impl SrunStdin {
    fn of_fd0() -> SrunStdin {
        use std::io::IsTerminal;
        use std::os::fd::AsFd;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let stdin = std::io::stdin();
        let Ok(fd) = stdin.as_fd().try_clone_to_owned() else {
            return SrunStdin::Closed;
        };
        let Ok(meta) = std::fs::File::from(fd).metadata() else {
            return SrunStdin::Closed;
        };
        let t = meta.file_type();
        if t.is_char_device() && meta.rdev() == libc::makedev(1, 3) {
            SrunStdin::DevNull
        } else if stdin.is_terminal() {
            SrunStdin::Terminal
        } else if t.is_fifo() {
            SrunStdin::Pipe
        } else if t.is_socket() {
            SrunStdin::Socket
        } else if t.is_file() {
            SrunStdin::File
        } else {
            SrunStdin::Other
        }
    }
}

/// What srun's stdin is, in a refusal, if srun would forward it to a migratable task (mode
/// `all`, the default, or a task number) and it can carry data: after a move the task reads
/// the restore step's stdin (/dev/null), so what srun forwards later is lost. `/dev/null`, a
/// closed stdin and `--input=none` lose nothing. Pure.
pub fn srun_stdin_cannot_follow(mode: Option<&str>, stdin: SrunStdin) -> Option<&'static str> {
    if mode == Some("none") {
        return None;
    }
    match stdin {
        SrunStdin::Closed | SrunStdin::DevNull => None,
        SrunStdin::Terminal => Some("a terminal"),
        SrunStdin::Pipe => Some("a pipe"),
        SrunStdin::Socket => Some("a socket"),
        SrunStdin::File => Some("a file"),
        SrunStdin::Other => Some("a device"),
    }
}

fn own_cmdline() -> Vec<String> {
    let Ok(raw) = std::fs::read("/proc/self/cmdline") else {
        return Vec::new();
    };
    let mut args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    args
}

/// srun's short options that take a value (its getopt string in Slurm 22.05-26.05).
const SRUN_SHORT_WITH_VALUE: &str = "ABcCdDeGiJLmMnNopqrStTwWx";

/// srun's options before the step's command, without knowing the command: srun's getopt stops
/// at the first argument that is not an option. A long option's value given as a separate word
/// (`--jobid 5`) ends the scan early, so this can miss an option but never reads the command's
/// own arguments. Pure.
pub fn leading_options(args: &[String]) -> &[String] {
    let rest = args.get(1..).unwrap_or_default();
    let mut i = 0;
    while i < rest.len() {
        let a = &rest[i];
        if a == "--" || !a.starts_with('-') || a == "-" {
            break;
        }
        if !a.starts_with("--") {
            // A cluster of short flags; the first one that takes a value ends it, and takes the
            // next word if nothing follows it in this one.
            let flags = &a[1..];
            if let Some((pos, _)) = flags
                .char_indices()
                .find(|(_, c)| SRUN_SHORT_WITH_VALUE.contains(*c))
            {
                if pos + 1 == flags.len() {
                    i += 1;
                }
            }
        }
        i += 1;
    }
    &rest[..i.min(rest.len())]
}

pub fn user_init(sp: Spank) -> libc::c_int {
    let mut st = state();
    let Some(Ok(cfg)) = st.config.clone() else {
        return 0;
    };
    if st.opts.wants_container(&cfg) && st.opts.restore.is_none() {
        // The step's command is known here: a second look, for what init_post_opt missed.
        let args = own_cmdline();
        let command = sp.argv().unwrap_or_default();
        if refuse_input(input_option(srun_options(&args, &command))) {
            return -1;
        }
        // Slurm passes no job to the exit callback in srun: keep the ids for it.
        if let (Ok(job), Ok(step)) = (sp.job_id(), sp.step_id()) {
            st.launched = Some((job, step, crate::follow::OutputFiles::default()));
            watch_output_files();
            crate::quiet::install(job, step, |job, step| {
                crate::follow::restore_steps(job)
                    .iter()
                    .any(|s| s.origin == step)
            });
        }
        ffi::log_verbose(&format!(
            "rebalancer: tasks will run in migratable containers (class {}, mode {})",
            st.opts.class(&cfg).as_deref().unwrap_or("default"),
            st.opts.mode(&cfg).map_or("default", |m| m.as_str())
        ));
    }
    0
}

/// At srun's exit: if tasks of this step moved and run on as restore steps, follow them (their
/// output and status become srun's). srun's own exit code is then replaced by the tasks'.
pub fn exit(_sp: Spank) -> libc::c_int {
    let launched = state().launched.take();
    let Some((job, step, files)) = launched else {
        return 0;
    };
    crate::quiet::remove();
    if let Some(code) = crate::follow::follow(job, step, &files) {
        // SAFETY: fflush(NULL) flushes every stdio stream; _exit ends srun with the task's code
        // (srun calls this from its atexit handler, where exit() must not be called again).
        unsafe {
            libc::fflush(std::ptr::null_mut());
            libc::_exit(code);
        }
    }
    0
}

/// srun opens `--output`/`--error` files just after this callback and closes them before its
/// exit callback: note them from a short-lived thread while they are open.
fn watch_output_files() {
    let spawned = std::thread::Builder::new()
        .name("rebalancer-io".into())
        .spawn(|| {
            for _ in 0..50 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let files = crate::follow::OutputFiles::of_this_process();
                if files.stdout.is_some() {
                    if let Some(l) = state().launched.as_mut() {
                        l.2 = files;
                    }
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        ffi::log_verbose(&format!(
            "rebalancer: cannot watch srun's output files: {e}"
        ));
    }
}

/// srun's own options: its argv without argv[0] and without the trailing step command. Pure.
pub fn srun_options<'a>(args: &'a [String], command: &[String]) -> &'a [String] {
    let rest = args.get(1..).unwrap_or_default();
    if !command.is_empty() && rest.ends_with(command) {
        &rest[..rest.len() - command.len()]
    } else {
        rest
    }
}

/// The last `--input`/`-i` value among srun's options (getopt_long forms: `--input=V`,
/// `--input V`, unique prefixes such as `--inp=V`, `-i V`, `-iV`). Pure.
pub fn input_option(options: &[String]) -> Option<String> {
    let is_input = |name: &str| name.len() >= 3 && "input".starts_with(name);
    let mut found = None;
    let mut it = options.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some((name, v)) if is_input(name) => found = Some(v.to_string()),
                None if is_input(long) => found = it.next().cloned().or(found),
                _ => {}
            }
        } else if let Some(v) = a.strip_prefix("-i") {
            found = if v.is_empty() {
                it.next().cloned().or(found)
            } else {
                Some(v.to_string())
            };
        }
    }
    found
}

/// Why a task with srun's `--input=VALUE` could not be migrated, or `None` if it can. `all`,
/// `none` and a task number are srun's own stdin ([`srun_stdin_cannot_follow`] decides on
/// that). A file name cannot follow: with a %-pattern
/// slurmstepd opens one file per task outside the container (slurmstepd 22.05 then leaves the
/// task without a waiter the agent accepts), and srun reads a plain file itself. Pure.
pub fn stdin_cannot_follow(value: &str) -> Option<&'static str> {
    if value.is_empty()
        || matches!(value, "all" | "none")
        || value.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    Some(if value.contains('%') {
        "a per-task input file cannot follow a task that moves to another node"
    } else {
        "srun feeds the file from this node, and a task that moves to another node would lose it"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn srun_input_is_read_from_its_own_options_only() {
        let args = v(&["srun", "-n1", "--input=in%t", "prog", "-i", "x"]);
        let command = v(&["prog", "-i", "x"]);
        let opts = srun_options(&args, &command);
        assert_eq!(opts, v(&["-n1", "--input=in%t"]).as_slice());
        assert_eq!(input_option(opts).as_deref(), Some("in%t"));
        // Without the command (SPANK did not give it), the whole line counts.
        assert_eq!(srun_options(&args, &[]).len(), 5);

        for (line, want) in [
            (&["--input", "f"][..], Some("f")),
            (&["--inp=g%t"][..], Some("g%t")),
            (&["-i", "h"][..], Some("h")),
            (&["-ik%n"][..], Some("k%n")),
            (&["-n1", "--migratable"][..], None),
            (&["--in=x"][..], None),
            (&["--", "-ix"][..], None),
            (&["-i", "a", "--input=b"][..], Some("b")),
        ] {
            assert_eq!(input_option(&v(line)).as_deref(), want, "{line:?}");
        }
    }

    #[test]
    fn leading_options_stop_at_the_command() {
        let args = v(&["srun", "-n", "2", "-i", "in%t", "-lN1", "prog", "-i", "x"]);
        assert_eq!(leading_options(&args), &args[1..6]);
        assert_eq!(
            input_option(leading_options(&args)).as_deref(),
            Some("in%t")
        );
        let args = v(&[
            "srun",
            "-lw",
            "node1",
            "--input=f",
            "--",
            "prog",
            "--input=g",
        ]);
        assert_eq!(input_option(leading_options(&args)).as_deref(), Some("f"));
        // The command's own options are never read.
        let args = v(&["srun", "prog", "-i", "x%t"]);
        assert_eq!(input_option(leading_options(&args)), None);
        assert!(leading_options(&v(&["srun"])).is_empty());
    }

    #[test]
    fn srun_stdin_that_can_carry_data_is_refused_unless_the_mode_is_none() {
        use SrunStdin::*;
        for mode in [None, Some("all"), Some("0"), Some("")] {
            assert_eq!(srun_stdin_cannot_follow(mode, DevNull), None, "{mode:?}");
            assert_eq!(srun_stdin_cannot_follow(mode, Closed), None, "{mode:?}");
            assert_eq!(srun_stdin_cannot_follow(mode, Terminal), Some("a terminal"));
            assert_eq!(srun_stdin_cannot_follow(mode, Pipe), Some("a pipe"));
            assert_eq!(srun_stdin_cannot_follow(mode, File), Some("a file"));
        }
        for kind in [Terminal, Pipe, Socket, File, Other] {
            assert_eq!(
                srun_stdin_cannot_follow(Some("none"), kind),
                None,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn file_inputs_are_refused_and_srun_stdin_is_not() {
        for ok in ["all", "none", "0", "12", ""] {
            assert_eq!(stdin_cannot_follow(ok), None, "{ok}");
        }
        assert!(stdin_cannot_follow("in%t").is_some_and(|w| w.contains("per-task")));
        assert!(stdin_cannot_follow("/work/in.txt").is_some_and(|w| w.contains("srun feeds")));
    }
}
