//! Filesystem paths built from what peers send (disk ids and paths, datastore and machine
//! names) stay inside the directory they belong to: no `..`, no absolute escape, no symlink
//! that leads out of it.
//!
//! Lexical checks come first (a path with `..` or, where a relative one is expected, an
//! absolute one is refused outright); then the deepest part of the path that exists is
//! resolved (symlinks followed) and must still lie inside the root, resolved the same way.

use std::path::{Component, Path, PathBuf};

/// `root/rel` for a relative `rel` made of plain components, refused if it leaves `root`.
pub fn relative_inside(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let path = Path::new(rel);
    if rel.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "`{rel}` is not a path inside {} (relative, without `..`)",
            root.display()
        ));
    }
    let joined = root.join(path);
    resolves_inside(root, &joined)?;
    Ok(joined)
}

/// An absolute path `abs` that must lie inside `root` (lexically and once resolved).
pub fn absolute_inside(root: &Path, abs: &str) -> Result<PathBuf, String> {
    let path = Path::new(abs);
    let plain = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let under = path.starts_with(root) || root.canonicalize().is_ok_and(|r| path.starts_with(r));
    if !path.is_absolute() || !plain || !under {
        return Err(format!(
            "`{abs}` is not a path inside {} (absolute, without `..`)",
            root.display()
        ));
    }
    resolves_inside(root, path)?;
    Ok(path.to_path_buf())
}

/// Whether `path` is lexically plain: absolute, no `.` or `..` (what the CS stores).
pub fn is_plain_absolute(path: &str) -> bool {
    let p = Path::new(path);
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Refuses `path` if what exists of it resolves (through symlinks) outside `root`.
fn resolves_inside(root: &Path, path: &Path) -> Result<(), String> {
    let real_root = root
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
    let mut existing = Some(path);
    while let Some(p) = existing {
        // symlink_metadata: a dangling symlink exists too (and is resolved, failing).
        if p.symlink_metadata().is_ok() {
            let real = p
                .canonicalize()
                .map_err(|e| format!("cannot resolve {}: {e}", p.display()))?;
            if !real.starts_with(&real_root) {
                return Err(format!(
                    "{} leads out of {} (to {}) through a symbolic link",
                    path.display(),
                    root.display(),
                    real.display()
                ));
            }
            return Ok(());
        }
        existing = p.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_inside_are_taken_and_escapes_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ds");
        std::fs::create_dir_all(root.join("vms/vm1")).expect("mkdir");
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(&outside).expect("mkdir");

        assert_eq!(
            relative_inside(&root, "vms/vm1/disk0.img").expect("inside"),
            root.join("vms/vm1/disk0.img")
        );
        for bad in [
            "",
            "../secret/x",
            "vms/../../secret",
            "/etc/passwd",
            "./vms",
        ] {
            assert!(relative_inside(&root, bad).is_err(), "{bad}");
        }
        let abs = root.join("vms/vm1/disk0.img").display().to_string();
        assert!(absolute_inside(&root, &abs).is_ok());
        let escape = format!("{}/../secret/x", root.display());
        assert!(absolute_inside(&root, &escape).is_err());
        assert!(absolute_inside(&root, "/etc/passwd").is_err());

        // A symbolic link inside the datastore that leads out of it: refused, for the link
        // itself and for anything beneath it that does not exist yet.
        std::os::unix::fs::symlink(&outside, root.join("vms/evil")).expect("symlink");
        let err = relative_inside(&root, "vms/evil/disk0.img").expect_err("escape");
        assert!(err.contains("symbolic link"), "{err}");
        assert!(relative_inside(&root, "vms/evil").is_err());
        let abs_evil = root.join("vms/evil/x.img").display().to_string();
        assert!(absolute_inside(&root, &abs_evil).is_err());
        // A link that stays inside is fine.
        std::os::unix::fs::symlink(root.join("vms/vm1"), root.join("vms/alias")).expect("link");
        assert!(relative_inside(&root, "vms/alias/disk0.img").is_ok());
    }
}
