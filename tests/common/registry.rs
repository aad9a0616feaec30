//! A real registry on loopback: Debian's docker-registry (the CNCF
//! distribution), plain HTTP on 127.0.0.1 at a free port, its storage in a
//! temporary dir. Stopped and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    pub addr: String,
    dir: PathBuf,
    child: Child,
}

impl Registry {
    pub fn start() -> Registry {
        super::require(&["docker-registry"]);
        let dir = PathBuf::from(super::sh("mktemp -d /tmp/ckpt-registry.XXXXXX").trim());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .unwrap();
        let r = Registry { addr, dir, child };
        let t = Instant::now();
        while std::net::TcpStream::connect(&r.addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "registry did not come up: {}",
                std::fs::read_to_string(r.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }
}

impl Registry {
    /// Has the containerd in `env_dir` pull from this registry over plain HTTP
    /// (hack/containerd.sh's `certs.d`, read at each pull).
    pub fn trusted_by(&self, env_dir: &std::path::Path) {
        let d = env_dir.join("certs.d").join(&self.addr);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{0}\"\n[host.\"http://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                self.addr
            ),
        )
        .unwrap();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
