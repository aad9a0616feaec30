#![deny(clippy::undocumented_unsafe_blocks)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use ckpt_shim::checkpoint::dump::DumpSettings;
use ckpt_shim::checkpoint::locate;
use ckpt_shim::checkpoint::{self, Options};
use ckpt_shim::config::Config;
use ckpt_shim::restore::{self, RestoreOptions};
use ckpt_shim::server;
use ckpt_shim::{inspect, preflight};

#[derive(Parser)]
#[command(
    name = "ckpt-shim",
    version,
    about = "CRI-to-CRIU checkpoint runtime shim"
)]
struct Cli {
    /// CRIU binary to drive [default: criu from PATH].
    #[arg(long, global = true)]
    criu: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// What `serve` and `check` both read: the TOML file, and the flags that win over it.
#[derive(Args)]
struct Settings {
    /// The real runtime's CRI endpoint [default: unix:///run/containerd/containerd.sock].
    #[arg(long)]
    upstream: Option<String>,
    /// TOML settings (absent is fine at the default path).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Parent dir for staging [default: beside each archive].
    #[arg(long)]
    staging_dir: Option<PathBuf>,
}

impl Settings {
    /// The file's settings with these flags, and `--criu`, over them.
    fn load(self, criu: Option<PathBuf>) -> ckpt_shim::Result<Config> {
        let mut cfg = Config::load(self.config)?;
        if let Some(v) = self.upstream {
            cfg.upstream = v;
        }
        if let Some(v) = self.staging_dir {
            cfg.staging_dir = Some(v);
        }
        if let Some(v) = criu {
            cfg.criu = v;
        }
        Ok(cfg)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve CRI runtime.v1 on a unix socket: CheckpointContainer natively, all else forwarded.
    Serve(ServeArgs),
    /// Can this node checkpoint? Checks CRIU, the kernel, capabilities, the
    /// directories and the upstream runtime; exits non-zero if any check fails.
    Check(CheckArgs),
    /// Checkpoint a running container of an OCI runtime (runc/crun state dir) into one archive.
    Checkpoint(CheckpointArgs),
    /// Restore an archive into a bundle (config.json + rootfs holding the image).
    Restore(RestoreArgs),
    /// Show what an archive holds: container, image, engine, sizes, CRIU
    /// statistics; with an identity, an encrypted archive's hidden parts too,
    /// every part authenticated.
    Inspect(InspectArgs),
    /// Write the plain archive of an encrypted one, for tools that read only
    /// plain ones (checkpointctl inspect, runc restore after extraction).
    Decrypt(DecryptArgs),
    /// Make an archive a checkpoint image: into containerd, an OCI layout or
    /// archive, or a registry. CreateContainer restores it by that name.
    Image(ImageArgs),
    /// The page source of one served restore (started by ckpt-runc, not by hand):
    /// the lazy-pages daemon of the staged restore DIR, fed from the archive.
    #[command(hide = true)]
    LazyServe(LazyServeArgs),
}

#[derive(Args)]
struct LazyServeArgs {
    dir: PathBuf,
    /// The restored init's pid file: killed if its memory cannot be served.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Be the page source's guard: kill the restored init unless the page
    /// source says on stdin that every page is in.
    #[arg(long)]
    guard: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Socket to listen on [default: /run/ckpt-shim/ckpt-shim.sock].
    #[arg(long)]
    listen: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    /// Log filter, e.g. info or debug [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// runc state dir of the upstream's containers [default: /run/containerd/runc/k8s.io].
    #[arg(long)]
    runc_root: Option<PathBuf>,
    /// Where restores wait for their container to start; the runtime's
    /// ckpt-runc must see the same in CKPT_SHIM_RESTORE_DIR [default: /var/lib/ckpt-shim/restore].
    #[arg(long)]
    restore_dir: Option<PathBuf>,
    /// Encrypt every checkpoint to this age recipient or SSH public key
    /// (repeatable; replaces the file's encrypt_to).
    #[arg(long, value_name = "RECIPIENT")]
    encrypt_to: Vec<String>,
    /// A root-only identity file that opens encrypted checkpoints restored
    /// here (repeatable; replaces the file's identities).
    #[arg(long, value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// Serve Prometheus metrics at GET /metrics on HOST:PORT or unix:///path.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    settings: Settings,
}

#[derive(Args)]
struct CheckpointArgs {
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
    /// Skip the fdatasync of the archive (it is still complete and atomic, not durable).
    #[arg(long)]
    no_fsync: bool,
    /// Dump into a staging dir first and build the archive after, instead of
    /// streaming CRIU's images straight into it.
    #[arg(long)]
    no_stream: bool,
    /// Memory to hold the pages in while the container is frozen: "auto"
    /// (within the node's available memory, as the server does) or MiB; 0
    /// writes them straight into the archive.
    #[arg(long, default_value = "auto")]
    hold_pages: ckpt_shim::checkpoint::hold::HoldPages,
    /// The number form's older name.
    #[arg(long, conflicts_with = "hold_pages")]
    hold_pages_mib: Option<u64>,
    /// Encrypt the archive to this age recipient or SSH public key (repeatable).
    #[arg(long, value_name = "RECIPIENT")]
    encrypt_to: Vec<String>,
}

#[derive(Args)]
struct RestoreArgs {
    archive: PathBuf,
    #[arg(long)]
    bundle: PathBuf,
    /// Name of the restored container.
    #[arg(long)]
    id: String,
    /// A root-only identity file for an encrypted archive (repeatable).
    #[arg(long, value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// `enforce`: the restored processes get no more than the bundle's
    /// config.json allows (refused where they would); `off`: as in the archive.
    #[arg(long, value_name = "enforce|off", default_value = "enforce", value_parser = parse_policy)]
    restore_policy: restore::policy::Mode,
}

fn parse_policy(s: &str) -> Result<restore::policy::Mode, String> {
    serde_json::from_value(s.into()).map_err(|_| format!("{s:?}: expected enforce or off"))
}

#[derive(Args)]
struct InspectArgs {
    archive: PathBuf,
    #[arg(long, value_name = "FILE")]
    identity: Vec<PathBuf>,
}

#[derive(Args)]
struct DecryptArgs {
    archive: PathBuf,
    #[arg(long, value_name = "FILE", required = true)]
    identity: Vec<PathBuf>,
    /// The plain archive to create (must not exist; root-only).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["import", "oci_layout", "oci_archive", "push"])))]
struct ImageArgs {
    archive: PathBuf,
    /// The image's name, e.g. 127.0.0.1:5000/ckpt/counter:v1 (unqualified
    /// names become localhost/NAME, as CRI-O has them).
    name: String,
    /// Import into the containerd with this socket (its k8s.io namespace).
    #[arg(long, value_name = "SOCKET")]
    import: Option<PathBuf>,
    /// Write an OCI image layout directory.
    #[arg(long, value_name = "DIR")]
    oci_layout: Option<PathBuf>,
    /// Write an OCI archive (tar of a layout), as `ctr images import` takes.
    #[arg(long, value_name = "FILE")]
    oci_archive: Option<PathBuf>,
    /// Push to the registry in NAME.
    #[arg(long)]
    push: bool,
    /// Talk plain HTTP to the registry (a local one).
    #[arg(long, requires = "push")]
    plain_http: bool,
}

fn main() -> ExitCode {
    // Installed as `ckpt-runc` (a link to this binary), it is the runtime's runc.
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new("ckpt-runc")) {
        return ExitCode::from(ckpt_shim::restore::runc::main(args.collect()) as u8);
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckpt-shim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CKPT_SHIM_LOG")
        .unwrap_or_else(|_| level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> ckpt_shim::Result<()> {
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        init_logging("info");
    }
    let criu = cli.criu;
    match cli.cmd {
        Cmd::Serve(a) => serve(a, criu).await,
        Cmd::Check(a) => check(a, criu).await,
        Cmd::Checkpoint(a) => checkpoint(a, driver(criu)).await,
        Cmd::Restore(a) => restore(a, driver(criu)).await,
        Cmd::Inspect(a) => {
            let ids = ckpt_shim::seal::Identities::load(&a.identity)?;
            print!("{}", inspect::inspect_with(&a.archive, &ids)?);
            Ok(())
        }
        Cmd::Decrypt(a) => decrypt(a),
        Cmd::Image(a) => image(a).await,
        Cmd::LazyServe(a) => {
            ckpt_shim::restore::lazy_serve::run(&ckpt_shim::restore::lazy_serve::Options {
                dir: a.dir,
                pid_file: a.pid_file,
                guard: a.guard,
            })
        }
    }
}

/// The CRIU to drive: `--criu`, else criu from PATH.
fn driver(criu: Option<PathBuf>) -> criu_rpc::Criu {
    criu_rpc::Criu::new(criu.unwrap_or_else(|| "criu".into()))
}

async fn serve(a: ServeArgs, criu: Option<PathBuf>) -> ckpt_shim::Result<()> {
    let mut cfg = a.settings.load(criu)?;
    // Flags win over the file.
    if !a.encrypt_to.is_empty() {
        cfg.encrypt_to = a.encrypt_to;
    }
    if !a.identity.is_empty() {
        cfg.identities = a.identity;
    }
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.log_level {
        cfg.log_level = v;
    }
    if let Some(v) = a.runc_root {
        cfg.runc_root = v;
    }
    if let Some(v) = a.restore_dir {
        cfg.restore_dir = v;
    }
    if a.metrics_listen.is_some() {
        cfg.metrics_listen = a.metrics_listen;
    }
    init_logging(&cfg.log_level);
    server::serve(cfg).await?;
    // Everything that must finish has (see `server::stop`); connections
    // still open and their tasks end with the process.
    std::process::exit(0);
}

async fn check(a: CheckArgs, criu: Option<PathBuf>) -> ckpt_shim::Result<()> {
    let cfg = a.settings.load(criu)?;
    let checks = preflight::run_checks(&cfg).await;
    print!("{}", preflight::table(&checks));
    match preflight::failures(&checks) {
        0 => Ok(()),
        failed => Err(ckpt_shim::Error::ChecksFailed {
            failed,
            total: checks.len(),
        }),
    }
}

async fn checkpoint(a: CheckpointArgs, criu: criu_rpc::Criu) -> ckpt_shim::Result<()> {
    let seal = ckpt_shim::seal::Recipients::parse(&a.encrypt_to)?.map(std::sync::Arc::new);
    let started = Instant::now();
    let c = locate::from_runtime_root(&a.runtime_root, &a.id)?;
    let opts = Options {
        location: a.output,
        deadline: a.timeout.map(|t| started + Duration::from_secs(t)),
        criu,
        settings: DumpSettings {
            tcp_established: a.tcp_established,
            ..Default::default()
        },
        staging_dir: None,
        freeze_journal: None,
        durable: !a.no_fsync,
        stream: !a.no_stream,
        hold: ckpt_shim::checkpoint::hold::Budget::new(ckpt_shim::checkpoint::hold::Policy {
            pages: a
                .hold_pages_mib
                .map_or(a.hold_pages, ckpt_shim::checkpoint::hold::HoldPages::Mib),
            ..Default::default()
        }),
        hold_cap: None,
        seal,
        // The node's restore dir, as the server has it (its config file).
        restore_dir: Some(Config::load(None)?.restore_dir),
    };
    let r = checkpoint::checkpoint(&c, &opts).await?;
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|(n, d)| format!("{n}={:.1}ms", d.as_secs_f64() * 1e3))
        .collect();
    let criu_frozen = r.stats.as_ref().and_then(|s| s.frozen_time).unwrap_or(0);
    println!(
        "checkpointed {} into {} ({} bytes{}) in {:.3}s; frozen {:.1}ms (CRIU {:.1}ms); {} bytes of pages held; {} bytes written while frozen; archive step wrote {} bytes; {}",
        c.id,
        r.location.display(),
        r.archive_bytes,
        if r.streamed { ", streamed" } else { "" },
        started.elapsed().as_secs_f64(),
        r.frozen.as_secs_f64() * 1e3,
        criu_frozen as f64 / 1e3,
        r.pages_held,
        r.frozen_written,
        r.archive_written_bytes,
        phases.join(" ")
    );
    r.cleanup.wait();
    Ok(())
}

async fn restore(a: RestoreArgs, criu: criu_rpc::Criu) -> ckpt_shim::Result<()> {
    let identities = std::sync::Arc::new(ckpt_shim::seal::Identities::load(&a.identity)?);
    let pid = restore::restore(&RestoreOptions {
        archive: a.archive,
        bundle: a.bundle,
        id: a.id.clone(),
        criu,
        settings: DumpSettings::default(),
        stdio: None,
        identities,
        policy: a.restore_policy,
    })
    .await?;
    println!("restored {} as pid {pid}", a.id);
    Ok(())
}

fn decrypt(a: DecryptArgs) -> ckpt_shim::Result<()> {
    let ids = ckpt_shim::seal::Identities::load(&a.identity)?;
    let mut ckpt = restore::Checkpoint::open(&a.archive)?;
    ckpt.unseal(std::sync::Arc::new(ids))?;
    let bytes = ckpt.write_plain(&a.output)?;
    println!("wrote {} ({bytes} bytes)", a.output.display());
    Ok(())
}

async fn image(a: ImageArgs) -> ckpt_shim::Result<()> {
    use ckpt_shim::image::{self, Dest};
    let dest = match (a.import, a.oci_layout, a.oci_archive) {
        (Some(s), _, _) => Dest::Containerd(s),
        (_, Some(d), _) => Dest::Layout(d),
        (_, _, Some(f)) => Dest::OciArchive(f),
        _ => Dest::Registry {
            plain_http: a.plain_http,
        },
    };
    debug_assert!(a.push || !matches!(dest, Dest::Registry { .. }));
    let (full, digest) = image::make(&a.archive, &a.name, &dest).await?;
    println!("{full} {digest}");
    Ok(())
}
