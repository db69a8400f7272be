//! Room on a destination: what incoming migrations announced, held against each other, and
//! the check of announced image sizes before any is received.

use std::sync::Arc;

use crate::agent::Agent;
use crate::error::AgentError;

/// Memory an incoming migration announced (its resident size at prepare), counted against the
/// room of every later arrival until this one ends (undone, committed, or its connection
/// closed: the reservation is dropped with its `Incoming`).
pub struct Reservation {
    agent: Arc<Agent>,
    migration: String,
}

impl Reservation {
    pub(super) fn hold(agent: &Arc<Agent>, migration: &str, bytes: u64) -> Reservation {
        agent.reserved().insert(migration.to_string(), bytes);
        Reservation {
            agent: agent.clone(),
            migration: migration.to_string(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.agent.reserved().remove(&self.migration);
    }
}

/// (bytes, count) reserved by incoming migrations other than `migration`.
pub(super) fn reserved_by_others(agent: &Agent, migration: &str) -> (u64, usize) {
    let r = agent.reserved();
    r.iter()
        .filter(|(m, _)| m.as_str() != migration)
        .fold((0u64, 0usize), |(b, n), (_, v)| {
            (b.saturating_add(*v), n + 1)
        })
}

/// Whether the image files an `images` request announces fit on this node: each file and their
/// sum within the image tmpfs's free space (`space_free`), and the sum within the memory
/// available less what other incoming migrations reserved (`memory`: available, (reserved,
/// how many)). An unknown figure is not checked. Pure.
pub fn check_announced_images(
    files: &[crate::peer::ImageFile],
    space_free: Option<u64>,
    memory: Option<(u64, (u64, usize))>,
    node: &str,
) -> Result<(), AgentError> {
    let sum = files
        .iter()
        .try_fold(0u64, |a, f| a.checked_add(f.size))
        .ok_or_else(|| {
            AgentError::BadRequest(format!(
                "the {} image sizes announced add up to more than 2^64 bytes",
                files.len()
            ))
        })?;
    if let Some(free) = space_free {
        if let Some(f) = files.iter().find(|f| f.size > free) {
            return Err(AgentError::NoRoom(format!(
                "image {:?} is announced at {} bytes, more than the {free} bytes free in {node}'s image tmpfs",
                f.name, f.size
            )));
        }
        if sum > free {
            return Err(AgentError::NoRoom(format!(
                "the source announces {sum} bytes of images in {} files; {node}'s image tmpfs has {free} bytes free",
                files.len()
            )));
        }
    }
    if let Some((avail, (reserved, n))) = memory {
        let room = avail.saturating_sub(reserved);
        if sum > room {
            return Err(AgentError::NoRoom(format!(
                "the source announces {sum} bytes of images; {node} has {avail} bytes of memory available, less {reserved} reserved by {n} other incoming migration(s)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64) -> crate::peer::ImageFile {
        crate::peer::ImageFile {
            name: name.into(),
            size,
        }
    }

    #[test]
    fn announced_images_must_fit_the_tmpfs_and_the_memory_left_by_other_arrivals() {
        let files = [file("core-1.img", 600), file("mm-1.img", 300)];
        assert!(check_announced_images(&files, Some(900), Some((900, (0, 0))), "n1").is_ok());
        assert!(check_announced_images(&files, None, None, "n1").is_ok());
        let e = check_announced_images(&files, Some(500), None, "n1").expect_err("a file too big");
        assert!(
            e.to_string()
                .contains("\"core-1.img\" is announced at 600 bytes")
                && e.to_string().contains("500 bytes free in n1's image tmpfs"),
            "{e}"
        );
        let e = check_announced_images(&files, Some(800), None, "n1").expect_err("the sum");
        assert!(
            e.to_string().contains("900 bytes of images in 2 files"),
            "{e}"
        );
        let e = check_announced_images(&files, Some(1 << 20), Some((1000, (200, 1))), "n1")
            .expect_err("others hold the memory");
        assert!(
            e.to_string()
                .contains("1000 bytes of memory available, less 200 reserved by 1 other"),
            "{e}"
        );
        // A hostile announcement cannot overflow the sum.
        let huge = [file("a", u64::MAX), file("b", 1)];
        let e = check_announced_images(&huge, Some(u64::MAX), None, "n1").expect_err("overflow");
        assert!(e.to_string().contains("more than 2^64 bytes"), "{e}");
    }
}
