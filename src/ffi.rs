//! Conversions between Rust strings and the C strings libslurm hands out or takes.

use std::ffi::{c_char, CStr, CString};

use crate::error::{Error, Result};

/// `s` as a C string; `what` names the argument in the error.
pub(crate) fn cstring(s: &str, what: &'static str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InteriorNul { what })
}

/// Copies a libslurm string; NULL becomes None.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid for the call.
pub(crate) unsafe fn opt_string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: non-NULL and NUL-terminated per this function's contract.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// Like [`opt_string`], with NULL and "" both meaning absent.
///
/// # Safety
/// As for [`opt_string`].
pub(crate) unsafe fn nonempty_string(p: *const c_char) -> Option<String> {
    // SAFETY: forwarded contract.
    unsafe { opt_string(p) }.filter(|s| !s.is_empty())
}

/// Splits a comma-separated libslurm list ("a,b"), dropping empty items.
pub(crate) fn split_list(s: Option<&str>) -> Vec<String> {
    s.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_rejected_with_the_argument_name() {
        let err = cstring("a\0b", "reason").unwrap_err();
        assert_eq!(err.to_string(), "reason contains a NUL byte");
    }

    #[test]
    fn lists_split_on_commas() {
        assert_eq!(split_list(Some("debug,batch")), vec!["debug", "batch"]);
        assert!(split_list(Some("")).is_empty());
        assert!(split_list(None).is_empty());
    }
}
