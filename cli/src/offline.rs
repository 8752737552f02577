//! `tidepool fs ...`: direct access to a stopped node's data folder through the fs API
//! (the data folder lock keeps it from running beside `tidepool up`).

use std::io::Write;

use clap::Subcommand;
use tidepool_fs::{Fs, InodeKind, ROOT_INO};

use crate::datadir::anyhow_free::Result;
use crate::node::Node;
use crate::settings::Settings;

#[derive(Subcommand)]
pub enum FsCmd {
    /// List a directory.
    Ls { path: String },
    /// Print a file to stdout.
    Cat { path: String },
    /// Copy a local file in (parent directories are created).
    Put { local: std::path::PathBuf, path: String },
    /// Create a directory and its parents.
    Mkdir { path: String },
    /// Remove a file, symlink or empty directory.
    Rm { path: String },
    /// Every file, one line each: `<size> <crc32c hex> <path>` (symlinks: `-> target`).
    Dump,
}

pub async fn run(settings: Settings, cmd: FsCmd) -> Result<()> {
    let node = Node::open(settings).await?;
    let res = exec(&node.fs, cmd).await;
    node.shutdown().await?;
    res
}

fn split_parent(path: &str) -> Result<(&str, &str)> {
    let p = path.trim_end_matches('/');
    let (parent, name) = p.rsplit_once('/').unwrap_or(("", p));
    if name.is_empty() {
        return Err("a path to an entry is needed, not the root".into());
    }
    Ok((parent, name))
}

async fn exec(fs: &Fs, cmd: FsCmd) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        FsCmd::Ls { path } => {
            let dir = fs.resolve(path.as_bytes())?;
            let mut after: Option<Vec<u8>> = None;
            loop {
                let (list, eof) = fs.readdir(dir.ino, after.as_deref(), 1000)?;
                for e in &list {
                    let kind = match e.attr.kind {
                        InodeKind::Dir => 'd',
                        InodeKind::File => '-',
                        InodeKind::Symlink => 'l',
                    };
                    writeln!(
                        out,
                        "{kind}{:04o} {:>12} {}",
                        e.attr.mode,
                        e.attr.size,
                        String::from_utf8_lossy(&e.name)
                    )?;
                }
                after = list.last().map(|e| e.name.clone());
                if eof || after.is_none() {
                    break;
                }
            }
        }
        FsCmd::Cat { path } => {
            let a = fs.resolve(path.as_bytes())?;
            let mut off = 0;
            while off < a.size {
                let chunk = fs.read(a.ino, off, 4 << 20).await?;
                if chunk.is_empty() {
                    break;
                }
                out.write_all(&chunk)?;
                off += chunk.len() as u64;
            }
        }
        FsCmd::Put { local, path } => {
            let data = std::fs::read(&local).map_err(|e| format!("cannot read {}: {e}", local.display()))?;
            let (parent, name) = split_parent(&path)?;
            let dir = fs.mkdir_all(parent.as_bytes(), 0o755).await?;
            let file = match fs.lookup(dir.ino, name.as_bytes()) {
                Ok(a) => {
                    fs.setattr(a.ino, tidepool_fs::SetAttr { size: Some(0), ..Default::default() }).await?;
                    a
                }
                Err(_) => fs.create(dir.ino, name.as_bytes(), 0o644, 0, 0).await?,
            };
            fs.write(file.ino, 0, &data).await?;
            writeln!(out, "{} bytes -> {path}", data.len())?;
        }
        FsCmd::Mkdir { path } => {
            fs.mkdir_all(path.as_bytes(), 0o755).await?;
        }
        FsCmd::Rm { path } => {
            let (parent, name) = split_parent(&path)?;
            let dir = fs.resolve(parent.as_bytes())?;
            let a = fs.lookup(dir.ino, name.as_bytes())?;
            if a.kind == InodeKind::Dir {
                fs.rmdir(dir.ino, name.as_bytes()).await?
            } else {
                fs.unlink(dir.ino, name.as_bytes()).await?
            }
        }
        FsCmd::Dump => dump(fs, ROOT_INO, b"", &mut out).await?,
    }
    Ok(())
}

/// Depth-first, name order: a stable listing tests compare against a model.
async fn dump(fs: &Fs, dir: u64, prefix: &[u8], out: &mut impl Write) -> Result<()> {
    let mut stack = vec![(dir, prefix.to_vec())];
    while let Some((dir, prefix)) = stack.pop() {
        let mut after: Option<Vec<u8>> = None;
        let mut subdirs = Vec::new();
        loop {
            let (list, eof) = fs.readdir(dir, after.as_deref(), 1000)?;
            for e in &list {
                let mut path = prefix.clone();
                path.push(b'/');
                path.extend_from_slice(&e.name);
                let shown = String::from_utf8_lossy(&path);
                match e.attr.kind {
                    InodeKind::Dir => {
                        writeln!(out, "dir {shown}")?;
                        subdirs.push((e.attr.ino, path));
                    }
                    InodeKind::Symlink => {
                        writeln!(out, "link {shown} -> {}", String::from_utf8_lossy(&fs.readlink(e.attr.ino)?))?
                    }
                    InodeKind::File => {
                        let mut crc = 0u32;
                        let mut off = 0;
                        while off < e.attr.size {
                            let chunk = fs.read(e.attr.ino, off, 4 << 20).await?;
                            if chunk.is_empty() {
                                break;
                            }
                            crc = crc32c::crc32c_append(crc, &chunk);
                            off += chunk.len() as u64;
                        }
                        writeln!(out, "file {shown} {} {crc:08x}", e.attr.size)?;
                    }
                }
            }
            after = list.last().map(|e| e.name.clone());
            if eof || after.is_none() {
                break;
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}
