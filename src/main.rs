use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use ckpt_shim::checkpoint::{self, Options};
use ckpt_shim::dump::DumpSettings;
use ckpt_shim::restore::{self, RestoreOptions};
use ckpt_shim::{inspect, locate};

#[derive(Parser)]
#[command(name = "ckpt-shim", version, about = "CRI-to-CRIU checkpoint runtime shim")]
struct Cli {
    /// CRIU binary to drive.
    #[arg(long, global = true, default_value = "criu")]
    criu: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Checkpoint a running container of an OCI runtime (runc/crun state dir) into one archive.
    Checkpoint {
        /// The runtime's state dir, e.g. /run/runc or /run/containerd/runc/k8s.io.
        #[arg(long)]
        runtime_root: PathBuf,
        /// Container ID or a unique prefix of one.
        id: String,
        /// Absolute path of the archive to create (must not exist).
        #[arg(long)]
        output: PathBuf,
        /// Give up (and leave the container running, nothing written) after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Also dump established TCP connections.
        #[arg(long)]
        tcp_established: bool,
    },
    /// Restore an archive into a bundle (config.json + rootfs holding the image).
    Restore {
        archive: PathBuf,
        #[arg(long)]
        bundle: PathBuf,
        /// Name of the restored container.
        #[arg(long)]
        id: String,
    },
    /// Show what an archive holds: container, image, engine, sizes, CRIU statistics.
    Inspect { archive: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CKPT_SHIM_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckpt-shim: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ckpt_shim::Result<()> {
    let criu = criu_rpc::Criu::new(cli.criu);
    match cli.cmd {
        Cmd::Checkpoint { runtime_root, id, output, timeout, tcp_established } => {
            let started = Instant::now();
            let deadline = timeout.map(|t| started + Duration::from_secs(t));
            let c = locate::from_runtime_root(&runtime_root, &id)?;
            let settings = DumpSettings { tcp_established, ..Default::default() };
            let r = checkpoint::checkpoint(&c, &Options { location: output, deadline, criu, settings }).await?;
            let phases: Vec<String> = r.phases.iter().map(|(n, d)| format!("{n}={:.1}ms", d.as_secs_f64() * 1e3)).collect();
            println!(
                "checkpointed {} into {} ({} bytes) in {:.3}s; frozen {:.1}ms; {}",
                c.id,
                r.location.display(),
                r.archive_bytes,
                started.elapsed().as_secs_f64(),
                r.frozen.as_secs_f64() * 1e3,
                phases.join(" ")
            );
            r.cleanup.wait();
        }
        Cmd::Restore { archive, bundle, id } => {
            let pid = restore::restore(&RestoreOptions { archive, bundle, id: id.clone(), criu, settings: DumpSettings::default(), stdio: None }).await?;
            println!("restored {id} as pid {pid}");
        }
        Cmd::Inspect { archive } => print!("{}", inspect::inspect(&archive)?),
    }
    Ok(())
}
