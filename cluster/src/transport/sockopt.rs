//! Socket options of every transport connection: `TCP_NODELAY`, and on Linux dead-peer
//! detection by the kernel, so that a silently cut network (a firewall dropping packets, a
//! network namespace torn down) closes the connection instead of leaving it hanging until
//! TCP gives up after many minutes — which is what lets a healed node catch up at once.
//!
//! - `SO_KEEPALIVE` with `TCP_KEEPIDLE` = dead_after / 3, `TCP_KEEPINTVL` = dead_after / 6,
//!   `TCP_KEEPCNT` = 3: an idle connection whose peer stops answering is closed.
//! - `TCP_USER_TIMEOUT` = dead_after: data left unacknowledged that long closes it. A peer that
//!   is alive but not reading (backpressure) still acknowledges window probes and is kept.

use std::time::Duration;

use tokio::net::TcpStream;

/// Sets the options; a failure is logged (the connection still works, only detects dead peers
/// later).
pub(crate) fn tune(s: &TcpStream, dead_after: Duration) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY");
    }
    if let Err(e) = dead_peer_detection(s, dead_after) {
        tracing::warn!(error = %e, "cannot set TCP keepalive / user timeout");
    }
}

#[cfg(target_os = "linux")]
fn dead_peer_detection(s: &TcpStream, dead_after: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;

    let fd = s.as_raw_fd();
    let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> std::io::Result<()> {
        // SAFETY: `fd` is an open socket owned by `s` for the duration of this call, and the
        // option value is a live `c_int` whose size is passed along.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(dead_after / 3))?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(dead_after / 6))?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    let ms = dead_after.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

#[cfg(not(target_os = "linux"))]
fn dead_peer_detection(_s: &TcpStream, _dead_after: Duration) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn get(s: &TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are live locals of the sizes passed; the fd is open.
        let r = unsafe { libc::getsockopt(s.as_raw_fd(), level, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        v
    }

    #[tokio::test]
    async fn options_are_set() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        tune(&s, Duration::from_secs(6));
        assert!(s.nodelay().unwrap());
        assert_eq!(get(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 2);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 1);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 6000);
    }
}
