//! Node metrics sources: the temperature and the load the agent reports in `NodeMetrics`.
//!
//! Configured under `[metrics]` (docs/agent.md). Temperature sources give the hottest reading in
//! °C; `load = "containers"` measures the CPU time of the processes in this agent's containers
//! instead of the kernel's load average, which every node sharing one kernel would report alike.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::procstat::ProcStat;

/// A command source gets this long before it is killed and the reading counts as missing; below
/// the controller's default agent timeout (3 s) so a hung sensor never makes a node look gone.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A command's reading is reused this long: BMC/IPMI queries are slow and the controller polls
/// every 2 s by default.
const COMMAND_REUSE: Duration = Duration::from_secs(10);
/// A window shorter than this gives too coarse a CPU measure (clock ticks are 10 ms).
const MIN_SPAN: Duration = Duration::from_millis(200);
/// Cap on the bytes read from a sensor file or a command's output.
const MAX_READING: usize = 64 * 1024;

/// Where the temperature comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemperatureSource {
    /// Thermal zones and hwmon sensors, whichever exist; no reading when there are none.
    Auto,
    None,
    Hwmon,
    ThermalZone,
    /// A file holding millidegrees Celsius, one integer per line (sysfs style).
    File(PathBuf),
    /// A program whose standard output holds degrees Celsius, one number per line.
    Command(Vec<String>),
}

/// What `load1` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// The kernel's 1-minute load average (/proc/loadavg).
    LoadAvg,
    /// CPUs kept busy by this agent's containers over the last window.
    Containers,
}

/// Validated `[metrics]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub temperature: TemperatureSource,
    pub load: LoadSource,
    /// Window of `load = "containers"`.
    pub load_window: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            temperature: TemperatureSource::Auto,
            load: LoadSource::LoadAvg,
            load_window: Duration::from_secs(60),
        }
    }
}

impl std::str::FromStr for TemperatureSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("file:") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err("`file:` needs an absolute path".into());
            }
            return Ok(TemperatureSource::File(p));
        }
        if let Some(c) = s.strip_prefix("command:") {
            let argv: Vec<String> = c.split_whitespace().map(str::to_string).collect();
            match argv.first() {
                Some(p) if Path::new(p).is_absolute() => {
                    return Ok(TemperatureSource::Command(argv))
                }
                _ => return Err("`command:` needs an absolute program path".into()),
            }
        }
        match s {
            "auto" => Ok(TemperatureSource::Auto),
            "none" => Ok(TemperatureSource::None),
            "hwmon" => Ok(TemperatureSource::Hwmon),
            "thermal-zone" => Ok(TemperatureSource::ThermalZone),
            _ => Err("expected \"auto\", \"none\", \"hwmon\", \"thermal-zone\", \"file:/PATH\" or \"command:/PATH ARGS\"".into()),
        }
    }
}

impl std::str::FromStr for LoadSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "loadavg" => Ok(LoadSource::LoadAvg),
            "containers" => Ok(LoadSource::Containers),
            _ => Err("expected \"loadavg\" or \"containers\"".into()),
        }
    }
}

/// Hottest value of a text of numbers, one a line (blank lines ignored), scaled by `scale`.
/// `None` when no line holds a finite number.
pub fn parse_hottest(text: &str, scale: f64) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|v| v / scale)
        .filter(|v| v.is_finite())
        .reduce(f64::max)
}

fn read_capped(path: &Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut s = String::new();
    f.take(MAX_READING as u64).read_to_string(&mut s).ok()?;
    Some(s)
}

/// Hottest of sysfs millidegree files matching `dir/<prefix>*/<name filter>`.
fn sysfs_hottest(dir: &Path, prefix: &str, file: impl Fn(&str) -> bool) -> Option<f64> {
    let mut hottest: Option<f64> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let Ok(files) = std::fs::read_dir(e.path()) else {
            continue;
        };
        for f in files.flatten() {
            if !file(&f.file_name().to_string_lossy()) {
                continue;
            }
            if let Some(v) = read_capped(&f.path()).and_then(|t| parse_hottest(&t, 1000.0)) {
                hottest = Some(hottest.map_or(v, |h| h.max(v)));
            }
        }
    }
    hottest
}

/// Hottest `thermal_zone*/temp` under `class` (normally /sys/class).
pub fn thermal_zones(class: &Path) -> Option<f64> {
    sysfs_hottest(&class.join("thermal"), "thermal_zone", |f| f == "temp")
}

/// Hottest `hwmon*/temp*_input` under `class` (normally /sys/class).
pub fn hwmon(class: &Path) -> Option<f64> {
    sysfs_hottest(&class.join("hwmon"), "hwmon", |f| {
        f.starts_with("temp") && f.ends_with("_input")
    })
}

fn run_command(argv: &[String], timeout: Duration) -> Option<f64> {
    let (prog, args) = argv.split_first()?;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(prog)
        .args(args)
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!(command = %prog, error = %e, "temperature command"))
        .ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                tracing::warn!(command = %prog, "temperature command timed out; killed");
                if let Ok(pgid) = i32::try_from(child.id()) {
                    // SAFETY: kill(2) with a negative pid signals the process group we created.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    use std::io::Read;
    let mut out = String::new();
    child
        .stdout
        .take()?
        .take(MAX_READING as u64)
        .read_to_string(&mut out)
        .ok()?;
    parse_hottest(&out, 1.0)
}

/// Reads the configured temperature source (blocking; a command may take up to 5 s).
pub fn temperature(src: &TemperatureSource) -> Option<f64> {
    let class = Path::new("/sys/class");
    match src {
        TemperatureSource::None => None,
        TemperatureSource::Auto => match (thermal_zones(class), hwmon(class)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        },
        TemperatureSource::Hwmon => hwmon(class),
        TemperatureSource::ThermalZone => thermal_zones(class),
        TemperatureSource::File(p) => read_capped(p).and_then(|t| parse_hottest(&t, 1000.0)),
        TemperatureSource::Command(argv) => run_command(argv, COMMAND_TIMEOUT),
    }
}

/// First number of /proc/loadavg.
pub fn loadavg() -> f64 {
    read_capped(Path::new("/proc/loadavg"))
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// CPU clock ticks used by every process in the pid namespace of each container's init (a host
/// pid), by container id, in one pass over `proc_root`. A container whose init is gone is absent.
pub fn pidns_cpu_ticks(proc_root: &Path, inits: &[(String, i32)]) -> BTreeMap<String, u64> {
    let ns_of = |pid: &str| std::fs::read_link(proc_root.join(pid).join("ns/pid")).ok();
    let by_ns: BTreeMap<PathBuf, &str> = inits
        .iter()
        .filter_map(|(id, pid)| ns_of(&pid.to_string()).map(|ns| (ns, id.as_str())))
        .collect();
    let mut totals = BTreeMap::new();
    if by_ns.is_empty() {
        return totals;
    }
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return totals;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some(id) = ns_of(pid).and_then(|ns| by_ns.get(&ns).copied()) else {
            continue;
        };
        // A process may exit between the two reads; its time then shows in its parent.
        let t = read_capped(&proc_root.join(pid).join("stat"))
            .as_deref()
            .and_then(ProcStat::parse)
            .map(|s| s.cpu_ticks)
            .unwrap_or(0);
        let sum: &mut u64 = totals.entry(id.to_string()).or_default();
        *sum = sum.saturating_add(t);
    }
    totals
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// One reading: CPU ticks per container.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    ticks: BTreeMap<String, u64>,
}

/// Samples of `load = "containers"` kept over the window.
#[derive(Debug, Default)]
pub struct LoadWindow {
    samples: VecDeque<Sample>,
}

impl LoadWindow {
    /// Records a reading and returns the CPUs busy since the oldest reading in `window`, or
    /// `None` when no earlier reading is at least 200 ms old. A container absent from the older
    /// reading started within the window, so all its time counts; one gone from the newer
    /// reading (ended, migrated away) no longer counts.
    pub fn push(
        &mut self,
        at: Instant,
        ticks: BTreeMap<String, u64>,
        window: Duration,
        ticks_per_s: f64,
    ) -> Option<f64> {
        // Keep the newest reading older than the window as the base of the full window.
        while self.samples.len() >= 2 && at.saturating_duration_since(self.samples[1].at) >= window
        {
            self.samples.pop_front();
        }
        let base = self
            .samples
            .iter()
            .find(|s| at.saturating_duration_since(s.at) >= MIN_SPAN)
            .cloned();
        // Readings closer together than MIN_SPAN add nothing but memory.
        if self
            .samples
            .back()
            .is_none_or(|s| at.saturating_duration_since(s.at) >= MIN_SPAN)
        {
            self.samples.push_back(Sample {
                at,
                ticks: ticks.clone(),
            });
        }
        let base = base?;
        let span = at.saturating_duration_since(base.at).as_secs_f64();
        let used: u64 = ticks
            .iter()
            .map(|(id, &t)| t.saturating_sub(base.ticks.get(id).copied().unwrap_or(0)))
            .sum();
        Some(used as f64 / ticks_per_s / span)
    }
}

/// Load windows by node name (one per agent; tests may run several agents in one process).
static WINDOWS: Mutex<BTreeMap<String, LoadWindow>> = Mutex::new(BTreeMap::new());

/// `load = "containers"`: CPUs busy in `containers` (id, init host pid) over the window. The
/// first call of an agent measures 250 ms.
pub fn containers_load(node: &str, containers: &[(String, i32)], window: Duration) -> f64 {
    let proc_root = Path::new("/proc");
    let read = || pidns_cpu_ticks(proc_root, containers);
    let tps = clock_ticks_per_s();
    let push = |ticks| {
        let mut w = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(node.to_string())
            .or_default()
            .push(Instant::now(), ticks, window, tps)
    };
    if let Some(v) = push(read()) {
        return v;
    }
    std::thread::sleep(MIN_SPAN + Duration::from_millis(50));
    push(read()).unwrap_or(0.0)
}

/// (load1, temperature) for `NodeMetrics`, per the configuration. Blocking.
pub fn read(node: &str, cfg: &MetricsConfig, containers: &[(String, i32)]) -> (f64, Option<f64>) {
    let load = match cfg.load {
        LoadSource::LoadAvg => loadavg(),
        LoadSource::Containers => containers_load(node, containers, cfg.load_window),
    };
    let temp = match &cfg.temperature {
        TemperatureSource::Command(_) => cached_temperature(node, &cfg.temperature, Instant::now()),
        other => temperature(other),
    };
    (load, temp)
}

/// Last command reading by node name, and when it was taken.
static COMMAND_READINGS: Mutex<BTreeMap<String, (Instant, Option<f64>)>> =
    Mutex::new(BTreeMap::new());

fn cached_temperature(node: &str, src: &TemperatureSource, now: Instant) -> Option<f64> {
    if let Some(&(at, v)) = COMMAND_READINGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(node)
    {
        if now.saturating_duration_since(at) < COMMAND_REUSE {
            return v;
        }
    }
    let v = temperature(src);
    COMMAND_READINGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(node.to_string(), (now, v));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "rebalancer-metrics-{tag}-{}-{}",
                std::process::id(),
                crate::agent::random_u32()
            ));
            std::fs::create_dir_all(&p).expect("tempdir");
            TempDir(p)
        }
        fn write(&self, rel: &str, text: &str) -> PathBuf {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
            std::fs::write(&p, text).expect("write");
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn sources_parse() {
        assert_eq!("auto".parse(), Ok(TemperatureSource::Auto));
        assert_eq!("thermal-zone".parse(), Ok(TemperatureSource::ThermalZone));
        assert_eq!(
            "file:/run/t".parse(),
            Ok(TemperatureSource::File("/run/t".into()))
        );
        assert_eq!(
            "command:/usr/bin/sensors -u  x".parse(),
            Ok(TemperatureSource::Command(vec![
                "/usr/bin/sensors".into(),
                "-u".into(),
                "x".into()
            ]))
        );
        assert!("file:rel".parse::<TemperatureSource>().is_err());
        assert!("command:sensors".parse::<TemperatureSource>().is_err());
        assert!("ipmi".parse::<TemperatureSource>().is_err());
        assert_eq!("containers".parse(), Ok(LoadSource::Containers));
        assert!("load1".parse::<LoadSource>().is_err());
    }

    #[test]
    fn hottest_reading_and_units() {
        assert_eq!(parse_hottest("45000\n\n91500\n60000\n", 1000.0), Some(91.5));
        assert_eq!(parse_hottest("garbage\n", 1000.0), None);
        assert_eq!(parse_hottest("", 1.0), None);
        assert_eq!(parse_hottest("NaN\n42.5\n", 1.0), Some(42.5));
    }

    #[test]
    fn file_source_reads_millidegrees() {
        let d = TempDir::new("file");
        let p = d.write("sensor", "87250\n");
        assert_eq!(
            temperature(&TemperatureSource::File(p.clone())),
            Some(87.25)
        );
        std::fs::write(&p, "not a number").expect("write");
        assert_eq!(temperature(&TemperatureSource::File(p)), None);
        assert_eq!(
            temperature(&TemperatureSource::File(d.0.join("missing"))),
            None
        );
    }

    #[test]
    fn command_source_reads_degrees() {
        let argv = |s: &str| vec!["/bin/sh".to_string(), "-c".into(), s.into()];
        assert_eq!(
            temperature(&TemperatureSource::Command(argv("echo 55.5; echo 61"))),
            Some(61.0)
        );
        assert_eq!(
            temperature(&TemperatureSource::Command(argv("exit 0"))),
            None
        );
        assert_eq!(
            temperature(&TemperatureSource::Command(vec!["/nonexistent/x".into()])),
            None
        );
    }

    #[test]
    fn a_command_reading_is_reused_for_a_while() {
        let d = TempDir::new("reuse");
        let runs = d.0.join("runs");
        let script = format!("echo x >> {}; echo 66", runs.display());
        let src = TemperatureSource::Command(vec!["/bin/sh".into(), "-c".into(), script]);
        let node = format!("reuse-{}", d.0.display());
        let t0 = Instant::now();
        assert_eq!(cached_temperature(&node, &src, t0), Some(66.0));
        assert_eq!(
            cached_temperature(&node, &src, t0 + Duration::from_secs(1)),
            Some(66.0)
        );
        let count = || {
            std::fs::read_to_string(&runs)
                .unwrap_or_default()
                .lines()
                .count()
        };
        assert_eq!(count(), 1);
        assert_eq!(
            cached_temperature(&node, &src, t0 + COMMAND_REUSE),
            Some(66.0)
        );
        assert_eq!(count(), 2);
    }

    #[test]
    fn a_hanging_command_is_killed_and_gives_no_reading() {
        // A sleep no one else runs, to find it afterwards.
        let nap = format!("sleep 31.{}", std::process::id());
        let argv = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            format!("echo 70; {nap}"),
        ];
        let t = Instant::now();
        assert_eq!(run_command(&argv, Duration::from_millis(300)), None);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // The command's own child went with it (its process group was killed).
        std::thread::sleep(Duration::from_millis(100));
        let left = std::process::Command::new("pgrep")
            .args(["-f", &format!("^{nap}$")])
            .output()
            .expect("pgrep");
        assert!(
            left.stdout.is_empty(),
            "left behind: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }

    #[test]
    fn sysfs_sources_take_the_hottest_sensor() {
        let d = TempDir::new("sysfs");
        d.write("thermal/thermal_zone0/temp", "41000\n");
        d.write("thermal/thermal_zone1/temp", "77000\n");
        d.write("thermal/cooling_device0/cur_state", "99000\n");
        d.write("hwmon/hwmon0/temp1_input", "50000\n");
        d.write("hwmon/hwmon0/temp2_input", "83000\n");
        d.write("hwmon/hwmon0/temp2_max", "100000\n");
        assert_eq!(thermal_zones(&d.0), Some(77.0));
        assert_eq!(hwmon(&d.0), Some(83.0));
        let empty = TempDir::new("empty");
        assert_eq!(thermal_zones(&empty.0), None);
        assert_eq!(hwmon(&empty.0), None);
    }

    #[test]
    fn own_pid_namespace_counts_this_process() {
        let me = std::process::id() as i32;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let all = pidns_cpu_ticks(
            Path::new("/proc"),
            &[("me".into(), me), ("gone".into(), -1)],
        );
        assert!(!all.contains_key("gone"), "{all:?}");
        let t = all["me"];
        let own = ProcStat::of(me).expect("own stat").cpu_ticks;
        assert!(t >= own, "{t} < {own}");
    }

    /// A /proc/PID entry of a fake /proc: its pid namespace link and a stat line whose
    /// utime, stime, cutime and cstime are `t`.
    fn fake_proc(root: &TempDir, pid: &str, ns: &str, t: [u64; 4]) {
        let stat = format!(
            "{pid} (w x) S 1 1 1 0 -1 0 0 0 0 0 {} {} {} {} 20 0 1 0 99\n",
            t[0], t[1], t[2], t[3]
        );
        root.write(&format!("{pid}/stat"), &stat);
        std::fs::create_dir_all(root.0.join(pid).join("ns")).expect("ns dir");
        std::os::unix::fs::symlink(ns, root.0.join(pid).join("ns/pid")).expect("ns link");
    }

    #[test]
    fn pid_namespace_sums_are_exact_and_kept_apart() {
        let root = TempDir::new("proc");
        fake_proc(&root, "100", "pid:[4026531836]", [10, 20, 0, 0]); // the host
        fake_proc(&root, "200", "pid:[4026532001]", [100, 50, 7, 3]); // a's init
        fake_proc(&root, "201", "pid:[4026532001]", [1, 2, 3, 4]);
        fake_proc(&root, "300", "pid:[4026532002]", [1000, 0, 0, 0]); // b's init
        fake_proc(&root, "301", "pid:[4026532002]", [5, 5, 0, 0]);
        fake_proc(&root, "302", "pid:[4026532002]", [0, 0, 0, 0]);
        // Not processes: ignored.
        root.write(
            "self/stat",
            "1 (x) S 1 1 1 0 -1 0 0 0 0 0 9 9 9 9 20 0 1 0 9\n",
        );
        root.write("loadavg", "0.00 0.00 0.00 1/1 1\n");
        // A process whose stat vanished between the two reads counts 0.
        std::fs::create_dir_all(root.0.join("303/ns")).expect("dirs");
        std::os::unix::fs::symlink("pid:[4026532002]", root.0.join("303/ns/pid")).expect("ns link");
        let all = pidns_cpu_ticks(
            &root.0,
            &[("a".into(), 200), ("b".into(), 300), ("gone".into(), 999)],
        );
        let want: BTreeMap<String, u64> =
            [("a".to_string(), 160 + 10), ("b".to_string(), 1000 + 10)].into();
        assert_eq!(all, want);
        // No container: nothing read, nothing summed (the host's processes never count).
        assert!(pidns_cpu_ticks(&root.0, &[]).is_empty());
    }

    #[test]
    fn load_window_counts_cpus_busy() {
        let mut w = LoadWindow::default();
        let t0 = Instant::now();
        let win = Duration::from_secs(10);
        let m = |v: &[(&str, u64)]| v.iter().map(|(k, t)| (k.to_string(), *t)).collect();
        assert_eq!(w.push(t0, m(&[("a", 1000)]), win, 100.0), None);
        // a: 1 CPU for 2 s; b appeared with 100 ticks (started within the window).
        let v = w
            .push(
                t0 + Duration::from_secs(2),
                m(&[("a", 1200), ("b", 100)]),
                win,
                100.0,
            )
            .expect("value");
        assert!((v - 1.5).abs() < 1e-9, "{v}");
        // a migrated away: only b counts; base is still t0 (window 10 s).
        let v = w
            .push(t0 + Duration::from_secs(4), m(&[("b", 300)]), win, 100.0)
            .expect("value");
        assert!((v - 0.75).abs() < 1e-9, "{v}");
        // 13 s: the base is the newest reading at least the window old (2 s), not t0.
        let v = w
            .push(t0 + Duration::from_secs(13), m(&[("b", 1400)]), win, 100.0)
            .expect("value");
        assert!((v - (1300.0 / 100.0 / 11.0)).abs() < 1e-9, "{v}");
        // A reading 100 ms after another measures against an older one.
        let v = w
            .push(
                t0 + Duration::from_millis(13_100),
                m(&[("b", 1410)]),
                win,
                100.0,
            )
            .expect("value");
        assert!(v > 0.0);
    }
}
