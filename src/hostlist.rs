//! Slurm hostlist expressions (`node[1-3,7]`): expansion and compression through libslurm's own
//! parser, so the result matches what slurmctld and scontrol print. No daemon or configuration needed.

use std::ffi::c_char;
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::ffi::{cstring, opt_string};
use crate::sys;

/// Longest compressed hostlist we are prepared to build.
const MAX_RANGED_LEN: usize = 16 << 20;

/// An owned `hostlist_t`.
#[derive(Debug)]
pub struct Hostlist {
    ptr: NonNull<sys::hostlist>,
}

// SAFETY: a hostlist is a heap object with its own mutex in libslurm; nothing ties it to the
// creating thread. &self methods only read it under that mutex.
unsafe impl Send for Hostlist {}

impl Hostlist {
    /// Parses `expr` (e.g. `"node[1-3],login1"`); an empty string gives an empty list.
    pub fn parse(expr: &str) -> Result<Self> {
        let c = cstring(expr, "hostlist expression")?;
        // SAFETY: `c` is a valid C string for the duration of the call; the function copies it.
        let raw = unsafe { sys::slurm_hostlist_create(c.as_ptr()) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::InvalidHostlist(expr.to_owned()))?;
        let list = Hostlist { ptr };
        // libslurm accepts some malformed ranges by producing an empty list.
        if list.is_empty() && !expr.trim().is_empty() {
            return Err(Error::InvalidHostlist(expr.to_owned()));
        }
        Ok(list)
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        // SAFETY: self.ptr is a live hostlist owned by self.
        let n = unsafe { sys::slurm_hostlist_count(self.ptr.as_ptr()) };
        usize::try_from(n).unwrap_or(0)
    }

    /// True if there are no hosts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the hosts of `expr`.
    pub fn push(&mut self, expr: &str) -> Result<()> {
        let c = cstring(expr, "hostlist expression")?;
        // SAFETY: live hostlist owned by self; `c` valid for the call and copied.
        let added = unsafe { sys::slurm_hostlist_push(self.ptr.as_ptr(), c.as_ptr()) };
        if added <= 0 && !expr.trim().is_empty() {
            return Err(Error::InvalidHostlist(expr.to_owned()));
        }
        Ok(())
    }

    /// Sorts and removes duplicates.
    pub fn uniq(&mut self) {
        // SAFETY: live hostlist owned by self.
        unsafe { sys::slurm_hostlist_uniq(self.ptr.as_ptr()) }
    }

    /// The compressed form (`node[1-3]`).
    pub fn ranged(&self) -> Result<String> {
        // The buffer variant exists in every release (the malloc variant went in 23.11).
        let mut buf: Vec<u8> = vec![0; 256];
        loop {
            // SAFETY: live hostlist; libslurm writes at most buf.len() bytes, NUL-terminated,
            // and returns -1 on truncation.
            let n = unsafe {
                sys::slurm_hostlist_ranged_string(
                    self.ptr.as_ptr(),
                    buf.len(),
                    buf.as_mut_ptr().cast::<c_char>(),
                )
            };
            if let Ok(n) = usize::try_from(n) {
                if n < buf.len() {
                    buf.truncate(n);
                    return Ok(String::from_utf8_lossy(&buf).into_owned());
                }
            }
            if buf.len() >= MAX_RANGED_LEN {
                return Err(Error::InvalidRequest(format!(
                    "hostlist of {} hosts is longer than {MAX_RANGED_LEN} bytes",
                    self.len()
                )));
            }
            buf.resize(buf.len() * 4, 0);
        }
    }

    /// Consumes the list and returns every host name in order.
    pub fn into_hosts(self) -> Vec<String> {
        let mut hosts = Vec::with_capacity(self.len());
        loop {
            // SAFETY: live hostlist; returns a malloc()ed host name or NULL when empty.
            let raw: *mut c_char = unsafe { sys::slurm_hostlist_shift(self.ptr.as_ptr()) };
            if raw.is_null() {
                break;
            }
            // SAFETY: non-NULL NUL-terminated string we own.
            if let Some(h) = unsafe { opt_string(raw) } {
                hosts.push(h);
            }
            // SAFETY: hostlist_shift returns strdup/malloc memory (hostrange_shift in hostlist.c).
            unsafe { libc::free(raw.cast()) };
        }
        hosts
    }
}

impl Drop for Hostlist {
    fn drop(&mut self) {
        // SAFETY: we own the hostlist and drop it exactly once.
        unsafe { sys::slurm_hostlist_destroy(self.ptr.as_ptr()) }
    }
}

/// Expands a hostlist expression into host names (`"n[1-2]"` → `["n1", "n2"]`).
pub fn expand(expr: &str) -> Result<Vec<String>> {
    Ok(Hostlist::parse(expr)?.into_hosts())
}

/// Compresses host names into one sorted, de-duplicated expression (`["n2", "n1"]` → `"n[1-2]"`).
pub fn compress<I, S>(hosts: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut list = Hostlist::parse("")?;
    for h in hosts {
        list.push(h.as_ref())?;
    }
    list.uniq();
    list.ranged()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_ranges_in_order() {
        assert_eq!(
            expand("node[1-3,7],login1").unwrap(),
            vec!["node1", "node2", "node3", "node7", "login1"]
        );
        assert_eq!(expand("n[08-10]").unwrap(), vec!["n08", "n09", "n10"]);
        assert!(expand("").unwrap().is_empty());
    }

    #[test]
    fn compresses_and_dedups() {
        assert_eq!(
            compress(["node3", "node1", "node2", "node1"]).unwrap(),
            "node[1-3]"
        );
        assert_eq!(compress(["node2"]).unwrap(), "node2");
        assert_eq!(compress(Vec::<String>::new()).unwrap(), "");
    }

    #[test]
    fn round_trips() {
        for expr in ["node[1-3]", "a[01-02],b7", "node[1,3,5-6]"] {
            let hosts = expand(expr).unwrap();
            assert_eq!(compress(&hosts).unwrap(), expr);
            assert_eq!(expand(&compress(&hosts).unwrap()).unwrap(), hosts);
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            expand("node[3-1]"),
            Err(Error::InvalidHostlist(_))
        ));
        assert!(matches!(
            expand("node[a-b]"),
            Err(Error::InvalidHostlist(_))
        ));
        assert!(matches!(expand("x\0y"), Err(Error::InteriorNul { .. })));
    }
}
