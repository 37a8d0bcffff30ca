//! A disk of the lab (a machine's disk in a datastore, or a replica disk on a master target):
//! either a raw sparse file, or an overlay of a frozen base shared by hard links and a sparse
//! delta of its own.
//!
//! Overlays let a failover create a VM's disks without copying every byte on filesystems that
//! cannot share extents (ext4, tmpfs): the replica's disk is frozen into a base no one writes
//! any more, and both the replica and the new VM go on as overlays over it, each writing only
//! its own delta. Where the filesystem shares extents (btrfs, XFS with reflink),
//! `copy_file_range` reflinks and plain copies stay the simpler choice ([`reflinks`]).
//!
//! # Layout
//!
//! ```text
//! raw:      P                  the disk: a sparse file of the disk's size
//! overlay:  P.overlay/base     the frozen base: an image no one writes while it has other links
//!           P.overlay/delta    a sparse file of the disk's size: the blocks written since
//! ```
//!
//! The path `P` names the disk either way; every reader and writer goes through [`VDisk`].
//!
//! # The delta
//!
//! A block ([`VDisk::block`] bytes, the filesystem's allocation unit, at least 4 KiB) belongs
//! to the delta exactly when the delta file holds data there (`SEEK_DATA`), so the delta needs
//! no map of its own and is durable with one fdatasync. That rests on two rules: writes to the
//! delta are whole blocks (a partial write first copies the rest of its block up from the
//! view), and zeros written over an overlay are written, never punched (a hole would let the
//! base show through). A directory whose filesystem does not report holes, or turns written
//! zeros into holes, is not given overlays ([`VDisk::freeze`] probes it first).
//!
//! # Switching layouts, crash-safe
//!
//! - freeze (raw -> overlay; only a raw file with one link, since another name could write
//!   it): link `P` as `P.overlay.new/base`, create the delta, fsync, rename the directory to
//!   `P.overlay`, fsync, unlink `P`.
//! - share (a new overlay `Q` over the same base): link the base as `Q.overlay.new/base`, copy
//!   the delta's blocks, fsync, rename to `Q.overlay`.
//! - fold (overlay -> raw; only while the base has no other link): copy the delta's blocks
//!   into the base, fdatasync, rename `P.overlay/base` to `P`, fsync, remove `P.overlay`.
//!
//! On open, `P.overlay/base` present means overlay (a `P` beside it is the same inode, left by a
//! freeze, and is unlinked); otherwise `P` is raw (a `P.overlay` beside it is what a fold left
//! and is removed). A `*.overlay.new` directory is an unfinished freeze or share: removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use nix::unistd::Whence;

use crate::direct::DirectFile;

/// Smallest overlay block: the page size, the allocation unit of every filesystem here.
const MIN_BLOCK: u64 = 4096;
/// Chunk for buffered copies and digests.
const CHUNK: usize = 1 << 20;
/// Zero ranges at least this long are punched into raw disks instead of written.
const PUNCH_MIN: usize = 4096;

/// Held while a base gains a link ([`VDisk::clone_to`]) and while a fold checks that its base
/// has no other link and makes it raw: the two cannot interleave within a process. Links to a
/// base are only made by the process that owns the datastore's replicas (the master target).
static BASE_LINKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn base_links_lock() -> std::sync::MutexGuard<'static, ()> {
    BASE_LINKS.lock().unwrap_or_else(|p| p.into_inner())
}

/// How [`VDisk::clone_to`] makes the new disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// A sparse copy of the allocated extents (reflinked where the filesystem shares extents).
    Copy,
    /// An overlay over this disk's base if it already is an overlay, a copy otherwise.
    IfFrozen,
    /// An overlay over this disk's base, freezing this disk first if it is raw (a copy where
    /// that is not possible: see [`VDisk::freeze`]).
    Freeze,
}

/// One disk, raw or overlay, open for reading and writing.
#[derive(Debug)]
pub struct VDisk {
    /// The disk's name, `P` in the module docs.
    path: PathBuf,
    /// Where writes go: `P` itself, or the overlay's delta.
    top: File,
    top_path: PathBuf,
    /// The frozen base of an overlay (read only).
    base: Option<File>,
    /// The disk's size (the top file's length).
    size: u64,
    /// Overlay block: copy-up granularity, the filesystem's allocation unit.
    block: u64,
    /// Page-cache-free writes of aligned spans, when asked for ([`VDisk::with_direct`]).
    direct: Option<DirectFile>,
}

fn overlay_dir(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".overlay");
    PathBuf::from(s)
}

fn staging_dir(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".overlay.new");
    PathBuf::from(s)
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn remove_dir_if_any(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(dir)(e)),
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn block_of(meta: &fs::Metadata) -> u64 {
    meta.blksize().max(MIN_BLOCK).next_power_of_two()
}

fn rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(at(path))
}

impl VDisk {
    /// Whether a disk (raw or overlay) exists at `path`.
    pub fn exists(path: &Path) -> bool {
        overlay_dir(path).join("base").exists() || path.is_file()
    }

    /// Opens the disk at `path` for reading and writing, finishing or undoing a layout switch
    /// that a crash interrupted (module docs).
    pub fn open(path: &Path) -> io::Result<VDisk> {
        remove_dir_if_any(&staging_dir(path))?;
        let ov = overlay_dir(path);
        let base_path = ov.join("base");
        if base_path.exists() {
            if path.exists() {
                let (a, b) = (
                    fs::metadata(path).map_err(at(path))?,
                    fs::metadata(&base_path).map_err(at(&base_path))?,
                );
                if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is both a raw disk and an overlay over another image; remove \
                             the one that is stale",
                            path.display()
                        ),
                    ));
                }
                fs::remove_file(path).map_err(at(path))?;
                fsync_dir(parent(path))?;
            }
            let delta = ov.join("delta");
            return VDisk::assemble(path, rw(&delta)?, delta, Some(File::open(&base_path)?));
        }
        remove_dir_if_any(&ov)?;
        VDisk::assemble(path, rw(path)?, path.to_path_buf(), None)
    }

    /// Opens the disk at `path` for reading only, without touching anything (for digests by
    /// another process than the disk's owner). Writes through it fail.
    pub fn open_read(path: &Path) -> io::Result<VDisk> {
        let ov = overlay_dir(path);
        let base_path = ov.join("base");
        match File::open(&base_path) {
            Ok(base) => {
                let delta = ov.join("delta");
                let top = File::open(&delta).map_err(at(&delta))?;
                VDisk::assemble(path, top, delta, Some(base))
            }
            Err(_) => {
                let top = File::open(path).map_err(at(path))?;
                VDisk::assemble(path, top, path.to_path_buf(), None)
            }
        }
    }

    /// Creates a raw sparse disk of `size` bytes at `path` (replacing nothing: it must not
    /// exist), atomically: a temporary file renamed into place.
    pub fn create(path: &Path, size: u64) -> io::Result<VDisk> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(at(&tmp))?;
        file.set_len(size).map_err(at(&tmp))?;
        file.sync_all().map_err(at(&tmp))?;
        fs::rename(&tmp, path).map_err(at(path))?;
        fsync_dir(parent(path))?;
        VDisk::assemble(path, file, path.to_path_buf(), None)
    }

    /// Removes the disk at `path`, whatever its layout (missing is fine).
    pub fn remove(path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at(path)(e)),
            _ => {}
        }
        remove_dir_if_any(&overlay_dir(path))?;
        remove_dir_if_any(&staging_dir(path))
    }

    fn assemble(
        path: &Path,
        top: File,
        top_path: PathBuf,
        base: Option<File>,
    ) -> io::Result<VDisk> {
        let meta = top.metadata().map_err(at(&top_path))?;
        Ok(VDisk {
            path: path.to_path_buf(),
            size: meta.len(),
            block: block_of(&meta),
            top,
            top_path,
            base,
            direct: None,
        })
    }

    /// Aligned writes to the top file bypass the page cache ([`crate::direct`]).
    pub fn with_direct(mut self) -> VDisk {
        self.direct = Some(DirectFile::new(&self.top_path));
        self
    }

    /// The disk's name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk's size in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the disk has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Whether the disk is an overlay over a frozen base.
    pub fn is_overlay(&self) -> bool {
        self.base.is_some()
    }

    /// The overlay block size (copy-up granularity).
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Links to the frozen base (1: this disk is its only user); `None` for a raw disk.
    pub fn base_links(&self) -> io::Result<Option<u64>> {
        match &self.base {
            Some(b) => Ok(Some(b.metadata()?.nlink())),
            None => Ok(None),
        }
    }

    /// Bytes allocated for what this disk holds itself: the whole raw file, or an overlay's
    /// delta (the base is shared).
    pub fn own_bytes(&self) -> io::Result<u64> {
        Ok(self.top.metadata().map_err(at(&self.top_path))?.blocks() * 512)
    }

    /// Sets the disk's size (growing reads as zeros; the base is never touched).
    pub fn set_len(&mut self, size: u64) -> io::Result<()> {
        self.top.set_len(size).map_err(at(&self.top_path))?;
        self.size = size;
        Ok(())
    }

    /// fdatasync of what this disk writes (the base never changes).
    pub fn sync_data(&self) -> io::Result<()> {
        self.top.sync_data().map_err(at(&self.top_path))
    }

    /// fsync of what this disk writes.
    pub fn sync_all(&self) -> io::Result<()> {
        self.top.sync_all().map_err(at(&self.top_path))
    }

    /// Fills `buf` with the disk's bytes at `offset`; past the end reads as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(base) = &self.base else {
            return read_full_at(&self.top, buf, offset).map_err(at(&self.top_path));
        };
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let data = seek_data(&self.top, pos)?.unwrap_or(u64::MAX);
            let (stop, from) = if data > pos {
                (data.min(end), base)
            } else {
                (
                    seek_hole(&self.top, pos, end)?.max(pos + 1).min(end),
                    &self.top,
                )
            };
            let range = (pos - offset) as usize..(stop - offset) as usize;
            read_full_at(from, &mut buf[range], pos).map_err(at(&self.path))?;
            pos = stop;
        }
        Ok(())
    }

    /// `len` bytes at `offset` in a new buffer (a raw disk reads into uninitialised capacity).
    pub fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if self.base.is_some() {
            let mut buf = vec![0u8; len];
            self.read_at(&mut buf, offset)?;
            return Ok(buf);
        }
        let mut buf = Vec::with_capacity(len);
        let mut f = &self.top;
        f.seek(io::SeekFrom::Start(offset))?;
        f.take(len as u64).read_to_end(&mut buf)?;
        buf.resize(len, 0);
        Ok(buf)
    }

    /// Writes `data` at `offset` (the caller checks the range and fdatasyncs). In an overlay a
    /// partial block is completed from the view first, so the delta only holds whole blocks.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        if self.base.is_none() {
            return self.write_top(data, offset);
        }
        let b = self.block;
        let start = offset / b * b;
        let stop = end.div_ceil(b).saturating_mul(b).min(self.size.max(end));
        if start == offset && stop == end {
            return self.write_top(data, offset);
        }
        let mut buf = vec![0u8; (stop - start) as usize];
        if start < offset {
            let head = b.min(stop - start) as usize;
            self.read_at(&mut buf[..head], start)?;
        }
        if stop > end {
            let tail = (end - 1) / b * b;
            self.read_at(&mut buf[(tail - start) as usize..], tail)?;
        }
        buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
        self.write_top(&buf, start)
    }

    /// [`VDisk::write_at`] for restoring an image: a long run of zeros punches a hole in a raw
    /// disk instead of allocating space (an overlay writes it, so the base stays hidden).
    pub fn restore_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.base.is_none()
            && data.len() >= PUNCH_MIN
            && data.iter().all(|b| *b == 0)
            && let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(data.len()))
        {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if nix::fcntl::fallocate(self.top.as_fd(), mode, off, len).is_ok() {
                return Ok(());
            }
        }
        self.write_at(data, offset)
    }

    fn write_top(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &mut self.direct
            && direct.write_at(data, offset).map_err(at(&self.top_path))?
        {
            return Ok(());
        }
        self.top
            .write_all_at(data, offset)
            .map_err(at(&self.top_path))
    }

    /// The first offset `>= pos` that may hold data (`None`: only zeros follow).
    pub fn next_data(&self, pos: u64) -> io::Result<Option<u64>> {
        let top = seek_data(&self.top, pos)?;
        let Some(base) = &self.base else {
            return Ok(top);
        };
        let below = seek_data(base, pos)?;
        Ok(match (top, below) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .filter(|p| *p < self.size))
    }

    /// The extents `(offset, len)` that may hold data, in order and merged; everything else
    /// reads as zeros.
    pub fn extents(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut all = extents_of(&self.top, self.size).map_err(at(&self.top_path))?;
        if let Some(base) = &self.base {
            all.extend(extents_of(base, self.size).map_err(at(&self.path))?);
            all.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
            for (off, len) in all {
                match merged.last_mut() {
                    Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
                    _ => merged.push((off, len)),
                }
            }
            all = merged;
        }
        Ok(all)
    }

    /// BLAKE3 hex of the whole disk.
    pub fn digest(&self) -> io::Result<String> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0;
        while off < self.size {
            let n = (self.size - off).min(CHUNK as u64) as usize;
            self.read_at(&mut buf[..n], off)?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        Ok(hasher.finalize().to_hex().to_string())
    }

    /// Makes a raw disk an overlay over its current content, frozen (module docs). `Ok(false)`
    /// when it can't: another hard link could write the file, or the filesystem does not keep
    /// the holes an overlay relies on. An overlay already is frozen: `Ok(true)`.
    pub fn freeze(&mut self) -> io::Result<bool> {
        if self.base.is_some() {
            return Ok(true);
        }
        let links = self.top.metadata().map_err(at(&self.path))?.nlink();
        if links > 1 {
            tracing::debug!(disk = %self.path.display(), links, "not frozen: the raw disk has other links");
            return Ok(false);
        }
        let dir = parent(&self.path).to_path_buf();
        if !keeps_holes(&dir, self.block)? {
            tracing::info!(dir = %dir.display(), "no overlays here: the filesystem does not keep holes");
            return Ok(false);
        }
        let staging = staging_dir(&self.path);
        remove_dir_if_any(&staging)?;
        fs::create_dir(&staging).map_err(at(&staging))?;
        if let Err(e) = fs::hard_link(&self.path, staging.join("base")) {
            tracing::info!(disk = %self.path.display(), error = %e, "not frozen: no hard links here");
            remove_dir_if_any(&staging)?;
            return Ok(false);
        }
        let delta = new_sparse(&staging.join("delta"), self.size)?;
        delta.sync_all().map_err(at(&staging))?;
        fsync_dir(&staging)?;
        let ov = overlay_dir(&self.path);
        fs::rename(&staging, &ov).map_err(at(&ov))?;
        fsync_dir(&dir)?;
        match fs::remove_file(&self.path) {
            // Another process's open already finished the switch.
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at(&self.path)(e)),
            _ => {}
        }
        fsync_dir(&dir)?;
        let base = std::mem::replace(&mut self.top, delta);
        self.base = Some(base);
        self.top_path = ov.join("delta");
        if self.direct.is_some() {
            self.direct = Some(DirectFile::new(&self.top_path));
        }
        tracing::info!(disk = %self.path.display(), "disk frozen: an overlay over its current content");
        Ok(true)
    }

    /// Folds an overlay back into a raw disk while no other disk shares its base (module
    /// docs). Returns whether it folded; a raw disk or a shared base: `Ok(false)`.
    pub fn fold_if_unshared(&mut self) -> io::Result<bool> {
        if self.base_links()? != Some(1) {
            return Ok(false);
        }
        let ov = overlay_dir(&self.path);
        let base_path = ov.join("base");
        let base = rw(&base_path)?;
        for (off, len) in extents_of(&self.top, self.size).map_err(at(&self.top_path))? {
            copy_range(&self.top, &base, off, off + len, false).map_err(at(&base_path))?;
        }
        base.set_len(self.size).map_err(at(&base_path))?;
        base.sync_all().map_err(at(&base_path))?;
        // A disk that came to share the base meanwhile (a seed taken from this one) copied this
        // delta, so the blocks written into the base are masked in its view too; but the base
        // must not become a writable raw disk under it: stay an overlay.
        let links = base_links_lock();
        if base.metadata().map_err(at(&base_path))?.nlink() != 1 {
            return Ok(false);
        }
        fs::rename(&base_path, &self.path).map_err(at(&self.path))?;
        drop(links);
        fsync_dir(parent(&self.path))?;
        remove_dir_if_any(&ov)?;
        self.top = base;
        self.top_path = self.path.clone();
        self.base = None;
        if self.direct.is_some() {
            self.direct = Some(DirectFile::new(&self.top_path));
        }
        tracing::info!(disk = %self.path.display(), "overlay folded back into a raw disk");
        Ok(true)
    }

    /// Makes a new disk at `dst` (replacing any there) with this disk's content, by `share`.
    /// Returns it and whether it is an overlay sharing this disk's base.
    pub fn clone_to(&mut self, dst: &Path, share: Share) -> io::Result<(VDisk, bool)> {
        VDisk::remove(dst)?;
        let shared = match share {
            Share::Copy => false,
            Share::IfFrozen => self.is_overlay(),
            Share::Freeze => self.freeze()?,
        };
        if shared && let Some(disk) = self.share_to(dst)? {
            return Ok((disk, true));
        }
        Ok((self.copy_to(dst)?, false))
    }

    /// An overlay at `dst` over this overlay's base, with a copy of this disk's delta; `None`
    /// where the base can't be linked there (another filesystem, no hard links).
    fn share_to(&self, dst: &Path) -> io::Result<Option<VDisk>> {
        let staging = staging_dir(dst);
        remove_dir_if_any(&staging)?;
        fs::create_dir(&staging).map_err(at(&staging))?;
        let linked = {
            let _links = base_links_lock();
            fs::hard_link(overlay_dir(&self.path).join("base"), staging.join("base"))
        };
        if let Err(e) = linked {
            tracing::info!(dst = %dst.display(), error = %e, "the base can't be linked there: copied");
            remove_dir_if_any(&staging)?;
            return Ok(None);
        }
        let delta = new_sparse(&staging.join("delta"), self.size)?;
        for (off, len) in extents_of(&self.top, self.size).map_err(at(&self.top_path))? {
            copy_range(&self.top, &delta, off, off + len, false).map_err(at(&staging))?;
        }
        delta.sync_all().map_err(at(&staging))?;
        fsync_dir(&staging)?;
        let ov = overlay_dir(dst);
        fs::rename(&staging, &ov).map_err(at(&ov))?;
        fsync_dir(parent(dst))?;
        VDisk::open(dst).map(Some)
    }

    /// A raw sparse copy at `dst` of the allocated extents, reflinked where the filesystem
    /// shares extents. Not synced.
    fn copy_to(&self, dst: &Path) -> io::Result<VDisk> {
        let out = new_sparse(dst, self.size)?;
        match &self.base {
            None => {
                for (off, len) in extents_of(&self.top, self.size).map_err(at(&self.path))? {
                    copy_range(&self.top, &out, off, off + len, true).map_err(at(dst))?;
                }
            }
            Some(base) => {
                for (off, len) in extents_of(base, self.size).map_err(at(&self.path))? {
                    copy_range(base, &out, off, off + len, true).map_err(at(dst))?;
                }
                // The delta's blocks over the base's, zeros included.
                for (off, len) in extents_of(&self.top, self.size).map_err(at(&self.top_path))? {
                    copy_range(&self.top, &out, off, off + len, false).map_err(at(dst))?;
                }
            }
        }
        VDisk::assemble(dst, out, dst.to_path_buf(), None)
    }
}

/// BLAKE3 hex of the disk at `path`, raw or overlay, read without changing anything.
pub fn digest_path(path: &Path) -> io::Result<String> {
    VDisk::open_read(path)?.digest()
}

/// Whether the filesystem of `dir` shares extents on `copy_file_range` (reflink): btrfs, XFS,
/// bcachefs, ZFS, OCFS2. XFS made without reflink support copies instead; that can't be told
/// without an ioctl, which this workspace does not use.
pub fn reflinks(dir: &Path) -> bool {
    const SHARING: [u64; 5] = [
        0x9123_683e, // btrfs
        0x5846_5342, // XFS
        0xca45_1a4e, // bcachefs
        0x2fc1_2fc1, // ZFS
        0x7461_636f, // OCFS2
    ];
    nix::sys::statfs::statfs(dir)
        .map(|s| SHARING.contains(&(s.filesystem_type().0 as u64)))
        .unwrap_or(false)
}

/// Whether files in `dir` report holes and keep written zeros as data: what an overlay's
/// delta relies on.
fn keeps_holes(dir: &Path, block: u64) -> io::Result<bool> {
    let probe = dir.join(format!(".holes-probe-{}", std::process::id()));
    let result = (|| {
        let f = new_sparse(&probe, 3 * block)?;
        f.write_all_at(&vec![0u8; block as usize], block)?;
        f.sync_data()?;
        Ok(seek_data(&f, 0)? == Some(block)
            && seek_hole(&f, block, u64::MAX)? == 2 * block
            && seek_data(&f, 2 * block)?.is_none())
    })();
    let _ = fs::remove_file(&probe);
    result
}

fn new_sparse(path: &Path, size: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(at(path))?;
    f.set_len(size).map_err(at(path))?;
    Ok(f)
}

/// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The first offset `>= pos` holding data (`None`: only a hole follows). Filesystems without
/// `SEEK_DATA` report everything as data.
fn seek_data(file: &File, pos: u64) -> io::Result<Option<u64>> {
    let Ok(at) = i64::try_from(pos) else {
        return Ok(None);
    };
    match nix::unistd::lseek(file.as_fd(), at, Whence::SeekData) {
        Ok(found) => Ok(Some(found.max(at) as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => Ok(Some(pos)),
        Err(e) => Err(e.into()),
    }
}

/// The first hole `>= pos` (the end of the file counts as one), at most `end`.
fn seek_hole(file: &File, pos: u64, end: u64) -> io::Result<u64> {
    let Ok(at) = i64::try_from(pos) else {
        return Ok(end);
    };
    match nix::unistd::lseek(file.as_fd(), at, Whence::SeekHole) {
        Ok(found) => Ok((found.max(at) as u64).min(end)),
        Err(Errno::ENXIO | Errno::EINVAL | Errno::EOPNOTSUPP) => Ok(end),
        Err(e) => Err(e.into()),
    }
}

/// The data extents of `file` within `[0, size)`.
fn extents_of(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek_data(file, pos)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek_hole(file, data, size)?.max(data + 1).min(size);
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Copies `[start, end)` from `src` to `dst` at the same offsets with `copy_file_range`
/// (reflinks where the filesystem can), else through memory; `skip_zeros` leaves all-zero
/// chunks unwritten (right only for a fresh sparse `dst`).
fn copy_range(src: &File, dst: &File, start: u64, end: u64, skip_zeros: bool) -> io::Result<()> {
    let mut pos = start;
    let mut kernel_copy = true;
    let mut buf = Vec::new();
    while pos < end {
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        if kernel_copy {
            let (Ok(mut off_in), Ok(mut off_out)) = (i64::try_from(pos), i64::try_from(pos)) else {
                return Err(io::Error::other("offset beyond i64"));
            };
            match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
            {
                Ok(0) => kernel_copy = false,
                Ok(n) => pos += n as u64,
                Err(Errno::EINTR) => {}
                Err(errno) => {
                    tracing::debug!(%errno, "copy_file_range unavailable, copying through memory");
                    kernel_copy = false;
                }
            }
            continue;
        }
        let n = want.min(CHUNK);
        buf.resize(CHUNK, 0);
        read_full_at(src, &mut buf[..n], pos)?;
        if !skip_zeros || buf[..n].iter().any(|b| *b != 0) {
            dst.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    /// A small deterministic generator (xorshift), so the tests need no crate for randomness.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn contents(d: &VDisk) -> Vec<u8> {
        let mut buf = vec![0u8; d.len() as usize];
        d.read_at(&mut buf, 0).expect("read");
        buf
    }

    /// Random writes, some unaligned, some all zeros, to `disk` and to the model.
    fn scribble(disk: &mut VDisk, model: &mut [u8], rng: &mut Rng, n: usize) {
        for _ in 0..n {
            let len = 1 + rng.below(3 * 4096) as usize;
            let off = rng.below(SIZE - len as u64);
            let zeros = rng.below(4) == 0;
            let data: Vec<u8> = (0..len)
                .map(|_| if zeros { 0 } else { rng.next() as u8 })
                .collect();
            disk.write_at(&data, off).expect("write");
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
    }

    fn raw_with_data(dir: &Path, rng: &mut Rng) -> (VDisk, Vec<u8>) {
        let mut disk = VDisk::create(&dir.join("d.img"), SIZE).expect("create");
        let mut model = vec![0u8; SIZE as usize];
        scribble(&mut disk, &mut model, rng, 40);
        (disk, model)
    }

    #[test]
    fn an_overlay_reads_and_writes_like_the_raw_disk_it_was_frozen_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = Rng(7);
        let (mut disk, mut model) = raw_with_data(dir.path(), &mut rng);
        assert!(disk.freeze().expect("freeze"), "ext4/tmpfs keep holes");
        assert!(disk.is_overlay());
        assert!(!dir.path().join("d.img").exists(), "the raw name is gone");
        assert_eq!(contents(&disk), model, "frozen: same bytes");
        let base_before = fs::read(dir.path().join("d.img.overlay/base")).expect("base");
        scribble(&mut disk, &mut model, &mut rng, 200);
        assert_eq!(contents(&disk), model, "writes over the overlay");
        assert_eq!(
            fs::read(dir.path().join("d.img.overlay/base")).expect("base"),
            base_before,
            "the base never changes"
        );
        // Zeros over data of the base must hide it, not let it show through.
        let (off, _) = disk.extents().expect("extents")[0];
        disk.write_at(&vec![0u8; 3 * 4096], off).expect("zeros");
        model[off as usize..off as usize + 3 * 4096].fill(0);
        disk.restore_at(&vec![0u8; 4096], off + 8192)
            .expect("restore zeros");
        assert_eq!(contents(&disk), model);
        disk.sync_data().expect("sync");
        drop(disk);
        let reopened = VDisk::open(&dir.path().join("d.img")).expect("reopen");
        assert_eq!(contents(&reopened), model, "durable in the delta alone");
        assert_eq!(
            reopened.digest().expect("digest"),
            blake3::hash(&model).to_hex().to_string()
        );
        for (off, len) in [(0, 1), (4095, 2), (SIZE - 5000, 5000), (12345, 70000)] {
            let v = reopened.read_vec(off, len).expect("read_vec");
            assert_eq!(v, model[off as usize..off as usize + len]);
        }
    }

    #[test]
    fn clones_share_the_base_and_diverge_and_the_last_user_folds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = Rng(11);
        let (mut disk, mut model) = raw_with_data(dir.path(), &mut rng);
        let vm = dir.path().join("vm.img");
        let (mut clone, shared) = disk.clone_to(&vm, Share::Freeze).expect("clone");
        assert!(shared, "an overlay over the same base");
        assert_eq!(disk.base_links().expect("links"), Some(2));
        let mut vm_model = model.clone();
        scribble(&mut disk, &mut model, &mut rng, 100);
        scribble(&mut clone, &mut vm_model, &mut rng, 100);
        assert_eq!(contents(&disk), model, "the replica goes on");
        assert_eq!(contents(&clone), vm_model, "the VM goes on, apart");
        // A second clone carries the first's delta.
        let (second, shared) = clone
            .clone_to(&dir.path().join("vm2.img"), Share::IfFrozen)
            .expect("second clone");
        assert!(shared);
        assert_eq!(contents(&second), vm_model);
        // A copy flattens.
        let (copy, shared) = clone
            .clone_to(&dir.path().join("copy.img"), Share::Copy)
            .expect("copy");
        assert!(!shared && !copy.is_overlay());
        assert_eq!(
            fs::read(dir.path().join("copy.img")).expect("copy"),
            vm_model
        );
        assert!(!disk.fold_if_unshared().expect("fold"), "shared: no fold");
        drop((clone, second));
        VDisk::remove(&vm).expect("remove vm");
        VDisk::remove(&dir.path().join("vm2.img")).expect("remove vm2");
        assert!(!vm.exists() && !dir.path().join("vm.img.overlay").exists());
        assert!(disk.fold_if_unshared().expect("fold"), "unshared: folded");
        assert!(!disk.is_overlay());
        assert_eq!(fs::read(dir.path().join("d.img")).expect("raw"), model);
        assert!(!dir.path().join("d.img.overlay").exists());
        // Writes after the fold land in the raw file.
        scribble(&mut disk, &mut model, &mut rng, 20);
        assert_eq!(fs::read(dir.path().join("d.img")).expect("raw"), model);
    }

    #[test]
    fn a_raw_disk_with_another_link_is_not_frozen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = Rng(3);
        let (mut disk, model) = raw_with_data(dir.path(), &mut rng);
        fs::hard_link(dir.path().join("d.img"), dir.path().join("seed.img")).expect("link");
        let (copy, shared) = disk
            .clone_to(&dir.path().join("vm.img"), Share::Freeze)
            .expect("clone");
        assert!(
            !shared && !disk.is_overlay(),
            "another name could write it: copied"
        );
        assert_eq!(contents(&copy), model);
    }

    #[test]
    fn a_clone_where_the_base_cannot_be_linked_is_a_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Another filesystem: the base can't be hard-linked there (EXDEV).
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm here: nothing to test");
            return;
        };
        let dev = |p: &Path| fs::metadata(p).expect("metadata").dev();
        if dev(dir.path()) == dev(other.path()) {
            eprintln!("/dev/shm is on the same filesystem here: nothing to test");
            return;
        }
        let mut rng = Rng(13);
        let (mut disk, model) = raw_with_data(dir.path(), &mut rng);
        let (clone, shared) = disk
            .clone_to(&other.path().join("vm.img"), Share::Freeze)
            .expect("clone");
        assert!(disk.is_overlay(), "the source froze");
        assert!(!shared && !clone.is_overlay(), "copied instead of failing");
        assert!(
            !other.path().join("vm.img.overlay.new").exists(),
            "no leftovers"
        );
        assert_eq!(contents(&clone), model);
    }

    #[test]
    fn open_finishes_or_undoes_an_interrupted_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.img");
        let mut rng = Rng(5);
        let (disk, model) = raw_with_data(dir.path(), &mut rng);
        drop(disk);
        // A freeze cut after the rename, before the unlink: overlay wins, the raw name goes.
        let ov = dir.path().join("d.img.overlay");
        fs::create_dir(&ov).expect("mkdir");
        fs::hard_link(&p, ov.join("base")).expect("link");
        new_sparse(&ov.join("delta"), SIZE).expect("delta");
        let d = VDisk::open(&p).expect("open");
        assert!(d.is_overlay() && !p.exists());
        assert_eq!(contents(&d), model);
        drop(d);
        // A fold cut after the rename: raw wins, the overlay directory goes.
        fs::rename(ov.join("base"), &p).expect("rename");
        let d = VDisk::open(&p).expect("open");
        assert!(!d.is_overlay() && !ov.exists());
        assert_eq!(contents(&d), model);
        // An unfinished freeze or share is dropped.
        fs::create_dir(dir.path().join("d.img.overlay.new")).expect("mkdir");
        drop(VDisk::open(&p).expect("open"));
        assert!(!dir.path().join("d.img.overlay.new").exists());
        assert!(VDisk::exists(&p));
        VDisk::remove(&p).expect("remove");
        assert!(!VDisk::exists(&p));
    }

    #[test]
    fn extents_cover_base_and_delta_and_grown_space_reads_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut disk = VDisk::create(&dir.path().join("d.img"), SIZE).expect("create");
        disk.write_at(&[1; 4096], 0).expect("w");
        assert!(disk.freeze().expect("freeze"));
        disk.write_at(&[2; 10], 8192 + 5).expect("w");
        disk.write_at(&[3; 4096], 4096).expect("w");
        assert_eq!(disk.extents().expect("extents"), vec![(0, 3 * 4096)]);
        assert_eq!(disk.next_data(3 * 4096).expect("next"), None);
        disk.set_len(2 * SIZE).expect("grow");
        disk.write_at(&[4; 3], SIZE + 1).expect("w");
        let mut tail = vec![9u8; 8];
        disk.read_at(&mut tail, SIZE).expect("read");
        assert_eq!(tail, [0, 4, 4, 4, 0, 0, 0, 0]);
        assert_eq!(disk.next_data(3 * 4096).expect("next"), Some(SIZE));
    }
}
