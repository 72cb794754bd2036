//! Which local process serves an engine's port, and whether two processes are one engine, read
//! from `/proc` (Linux). The collector sees other processes only in its own PID namespace: on
//! Kubernetes that takes `hostPID` (the pod path needs none of this).

use std::net::IpAddr;
use std::path::Path;

/// Whether `host` names this machine: a loopback name or address, the host name, or an IPv4
/// address the kernel lists as local.
pub fn is_local(proc_root: &Path, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() || ip.is_unspecified() => true,
        Ok(IpAddr::V4(ip)) => local_ipv4(proc_root).contains(&ip.to_string()),
        Ok(IpAddr::V6(_)) => false,
        Err(_) => std::fs::read_to_string(proc_root.join("sys/kernel/hostname"))
            .is_ok_and(|h| h.trim().eq_ignore_ascii_case(host)),
    }
}

/// The addresses `/proc/net/fib_trie` marks `/32 host LOCAL`.
fn local_ipv4(proc_root: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(proc_root.join("net/fib_trie")) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[1].contains("/32 host LOCAL"))
        .filter_map(|w| w[0].trim().strip_prefix("|-- "))
        .map(str::to_owned)
        .collect()
}

/// The process listening on TCP `port`, if this namespace shows it.
pub fn listening_pid(proc_root: &Path, port: u16) -> Option<u32> {
    let inodes = listening_inodes(proc_root, port);
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The lowest PID holding the socket: a server's parent before the workers it forked.
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        std::fs::read_dir(proc_root.join(pid.to_string()).join("fd"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| wanted.iter().any(|w| link.as_os_str() == w.as_str()))
    })
}

/// Inodes of the sockets in `LISTEN` (state `0A`) on `port`, IPv4 and IPv6.
fn listening_inodes(proc_root: &Path, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(proc_root.join(table)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                if let Ok(i) = inode.parse() {
                    out.push(i);
                }
            }
        }
    }
    out
}

/// A process's parent, from `/proc/<pid>/stat` (the field after the parenthesised name, which
/// may itself hold spaces and parentheses).
pub fn parent(proc_root: &Path, pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether one of `a` and `b` is the other or an ancestor of it: an engine's server and the
/// workers that hold its GPUs count as one engine.
pub fn same_tree(proc_root: &Path, a: u32, b: u32) -> bool {
    descends(proc_root, a, b) || descends(proc_root, b, a)
}

fn descends(proc_root: &Path, child: u32, ancestor: u32) -> bool {
    let mut pid = child;
    // PID 1 and 0 end every chain; the bound guards against a cycle from a racing reuse.
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        match parent(proc_root, pid) {
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_root() -> &'static Path {
        Path::new("/proc")
    }

    #[test]
    fn finds_the_process_listening_on_a_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listening_pid(proc_root(), port), Some(std::process::id()));
        drop(l);
        assert_eq!(listening_pid(proc_root(), port), None, "closed: nobody");
    }

    #[test]
    fn a_child_is_in_its_parents_tree_and_strangers_are_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        assert_eq!(parent(proc_root(), child.id()), Some(me));
        assert!(same_tree(proc_root(), me, child.id()));
        assert!(same_tree(proc_root(), child.id(), me));
        assert!(!same_tree(proc_root(), child.id(), 1));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn local_hosts() {
        for h in ["localhost", "127.0.0.1", "[::1]", "0.0.0.0"] {
            assert!(is_local(proc_root(), h), "{h}");
        }
        assert!(
            !is_local(proc_root(), "192.0.2.7"),
            "a documentation address"
        );
        assert!(!is_local(proc_root(), "engine.example.com"));
    }

    #[test]
    fn a_process_name_with_parentheses_and_spaces_still_gives_its_parent() {
        let dir = std::env::temp_dir().join(format!("eff-stat-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("42")).unwrap();
        std::fs::write(dir.join("42/stat"), "42 (my (odd) name) S 7 42 42 0").unwrap();
        assert_eq!(parent(&dir, 42), Some(7));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
