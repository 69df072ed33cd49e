//! `berth image`: building and maintaining the root filesystems jobs run on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use berth_backend_support::generations::{disk_usage, Draft, ImageLock, Images};

use crate::cli::{Bootstrapper, Cli, ImageArgs, ImageCommand};
use crate::config;
use crate::exit::Done;

/// Packages every image gets: what booting and CI jobs need.
const BASE_PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus", "git", "ca-certificates", "curl"];
const UBUNTU_SUITES: &[&str] = &["focal", "jammy", "noble", "oracular", "plucky"];
const DEFAULT_UPDATE: &str = "#!/bin/sh\nset -e\napt-get update -qq\napt-get -y -qq dist-upgrade\napt-get clean\n";

/// Progress lines with the elapsed time.
struct Progress(Instant);

impl Progress {
    fn step(&self, what: &str) {
        println!("[{:6.1} s] {what}", self.0.elapsed().as_secs_f64());
    }
}

/// Where images are when neither `--images-dir` nor a runner says.
const DEFAULT_IMAGES_DIR: &str = "/var/lib/berth/images";

/// `berth image ...`.
pub fn main(cli: &Cli, args: &ImageArgs) -> Result<Done> {
    let (dir, source) = images_dir(cli, args)?;
    // Which directory, and why: an image built where the runner does not look is refused at every job.
    eprintln!("images: {} ({source})", dir.display());
    let images = Images::new(&dir);
    let progress = Progress(Instant::now());
    let lock = |name: &str| -> Result<ImageLock> {
        images
            .lock(name, || println!("waiting for another `berth image` command on {name} to finish..."))
            .with_context(|| format!("failed to lock image {name}"))
    };
    match &args.command {
        ImageCommand::Create { name, suite, mirror, include, setup, tool } => {
            let tool = match tool {
                Bootstrapper::Auto if which("mmdebstrap") => "mmdebstrap",
                Bootstrapper::Auto | Bootstrapper::Debootstrap => "debootstrap",
                Bootstrapper::Mmdebstrap => "mmdebstrap",
            };
            if !which(tool) {
                bail!("{tool} is not installed (apt-get install {tool})");
            }
            let lock = lock(name)?;
            let draft = images.draft(&lock).with_context(|| format!("failed to start image {name}"))?;
            bootstrap(&draft, tool, suite, mirror.as_deref(), include, &progress)?;
            if let Some(script) = setup {
                progress.step(&format!("running {} in the image", script.display()));
                run_in(draft.path(), Some(script), None)?;
            }
            publish(draft, name, &progress)?;
        }
        ImageCommand::Import { name, source } => {
            let lock = lock(name)?;
            let draft = images.draft(&lock).with_context(|| format!("failed to start image {name}"))?;
            progress.step(&format!("importing {}", source.display()));
            import(&draft, source)?;
            check_usable(draft.path())?;
            publish(draft, name, &progress)?;
        }
        ImageCommand::Update { name, script } => {
            let lock = lock(name)?;
            progress.step(&format!("copying the current generation of {name}"));
            let draft = images
                .draft_from_current(&lock)
                .with_context(|| format!("failed to start a new generation of {name}"))?;
            progress.step("updating");
            run_in(draft.path(), script.as_deref(), Some(DEFAULT_UPDATE))?;
            publish(draft, name, &progress)?;
        }
        ImageCommand::Shell { name } => {
            let lock = lock(name)?;
            let draft = images
                .draft_from_current(&lock)
                .with_context(|| format!("failed to start a new generation of {name}"))?;
            println!("A shell in a new generation of {name}: changes are published when it exits with status 0, dropped otherwise.");
            let status = enter(draft.path(), &[], true)?;
            if !status.success() {
                println!("The shell exited with {status}: changes dropped, {name} is unchanged.");
                return Ok(Done::Unsuccessful);
            }
            publish(draft, name, &progress)?;
        }
        ImageCommand::Remove { name, force } => {
            let lock = lock(name)?;
            let users = images.remove(&lock, *force).with_context(|| format!("failed to remove image {name}"))?;
            println!("removed image {name}");
            if !users.is_empty() {
                eprintln!(
                    "WARNING: image {name} was in use ({}): those jobs' next stages fail as system failures \
                     (their root lost its files)",
                    users.join(", ")
                );
            }
        }
        ImageCommand::List => list(&images)?,
        ImageCommand::Prune => {
            for line in images.prune(false) {
                println!("removed {line}");
            }
        }
    }
    Ok(Done::Success)
}

/// The images directory for this command, and where it came from: the
/// option (or `BERTH_IMAGES_DIR`), else the `images_dir` of the runner given
/// with `--runner` (its settings checked as a job's would be), else the default.
fn images_dir(cli: &Cli, args: &ImageArgs) -> Result<(PathBuf, String)> {
    if let Some(dir) = &args.images_dir {
        return Ok((dir.clone(), "--images-dir or BERTH_IMAGES_DIR".to_owned()));
    }
    let Some(name) = &cli.runner else {
        return Ok((PathBuf::from(DEFAULT_IMAGES_DIR), "the default; --runner NAME uses that runner's".to_owned()));
    };
    let runner = config::load(&cli.config, Some(name))?;
    let backend = crate::registry::load(&runner)?;
    if !backend.describe().capabilities.images {
        bail!(
            "runner {name} (backend {}) runs no images, so it has no images_dir; give --images-dir, or a runner whose backend uses images",
            backend.describe().name
        );
    }
    Ok(match runner.settings.get("images_dir").and_then(toml::Value::as_str) {
        Some(dir) => (PathBuf::from(dir), format!("images_dir of runner {name}")),
        None => (PathBuf::from(DEFAULT_IMAGES_DIR), format!("runner {name} sets no images_dir: the default")),
    })
}

fn publish(draft: Draft, name: &str, progress: &Progress) -> Result<()> {
    let number = draft.number();
    draft.publish().with_context(|| format!("failed to publish generation {number} of {name}"))?;
    progress.step(&format!("image {name} is now generation {number}; running jobs keep theirs"));
    Ok(())
}

fn bootstrap(
    draft: &Draft,
    tool: &str,
    suite: &str,
    mirror: Option<&str>,
    include: &[String],
    progress: &Progress,
) -> Result<()> {
    if !suite.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || suite.is_empty() {
        bail!("--suite {suite:?} is not a suite name (bookworm, trixie, noble, ...)");
    }
    let mirror = mirror.unwrap_or(if UBUNTU_SUITES.contains(&suite) {
        "http://archive.ubuntu.com/ubuntu"
    } else {
        "http://deb.debian.org/debian"
    });
    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    packages
        .extend(include.iter().flat_map(|i| i.split(',')).map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned));
    let packages = packages.join(",");
    progress.step(&format!("{tool} {suite} from {mirror} (a minute or two)"));
    let mut cmd = Command::new(tool);
    cmd.arg("--variant=minbase").arg(format!("--include={packages}")).arg(suite).arg(draft.path()).arg(mirror);
    let out =
        cmd.stdin(Stdio::null()).output().with_context(|| format!("failed to run {tool} (apt-get install {tool})"))?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        bail!(
            "{tool} failed; nothing was published. Its output ends with:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // Each container gets its own machine id and host name at boot.
    std::fs::write(draft.path().join("etc/machine-id"), "").context("failed to reset etc/machine-id")?;
    std::fs::write(draft.path().join("etc/hostname"), "localhost\n").context("failed to reset etc/hostname")?;
    Ok(())
}

fn which(name: &str) -> bool {
    berth_backend_support::settings::which(name).is_some()
}

fn import(draft: &Draft, source: &Path) -> Result<()> {
    let status = if source.is_dir() {
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(format!("{}/.", source.display()))
            .arg(draft.path())
            .status()
    } else if source.is_file() {
        Command::new("tar")
            .arg("-xf")
            .arg(source)
            .arg("-C")
            .arg(draft.path())
            .args(["--numeric-owner", "--xattrs"])
            .status()
    } else {
        bail!("{} is neither a directory nor a tarball", source.display());
    }
    .context("failed to run cp or tar")?;
    if !status.success() {
        bail!("failed to import {}; nothing was published", source.display());
    }
    Ok(())
}

/// A root filesystem needs a shell; booting it with nspawn needs systemd.
fn check_usable(root: &Path) -> Result<()> {
    let exists = |p: &str| root.join(p).symlink_metadata().is_ok();
    if !exists("bin/sh") && !exists("usr/bin/sh") {
        bail!("the imported tree has no /bin/sh: it is not a usable root filesystem; nothing was published");
    }
    if !exists("bin/bash") && !exists("usr/bin/bash") {
        bail!("the imported tree has no bash, which GitLab Runner's scripts need; nothing was published");
    }
    if !exists("lib/systemd/systemd") && !exists("usr/lib/systemd/systemd") {
        println!("WARNING: no systemd in the imported tree: the chroot backend can use it, the nspawn backend cannot boot it");
    }
    Ok(())
}

/// Runs `script` (a file, or `default` text) as root inside `root` (see
/// [`enter`]), with a minimal /dev, its own /proc, a read-only /sys and the
/// host's resolv.conf.
fn run_in(root: &Path, script: Option<&Path>, default: Option<&str>) -> Result<()> {
    let target = root.join("tmp/berth-image-script");
    match (script, default) {
        (Some(script), _) => {
            std::fs::copy(script, &target).with_context(|| format!("failed to copy {}", script.display()))?;
        }
        (None, Some(text)) => std::fs::write(&target, text).context("failed to write the update script")?,
        (None, None) => bail!("nothing to run"),
    }
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let status = enter(root, &["/tmp/berth-image-script"], false);
    let _ = std::fs::remove_file(&target);
    let status = status?;
    if !status.success() {
        bail!("the script failed ({status}); nothing was published");
    }
    Ok(())
}

/// Runs `argv` (a login shell when empty) as root inside the image whose
/// draft is `root`, in the same sandbox as jobs (`support::sandbox::maintain`):
/// the image's root is a uid range of its own on the host, with a system
/// call filter, no host devices and the host's `/` out of reach.
fn enter(root: &Path, argv: &[&str], interactive: bool) -> Result<std::process::ExitStatus> {
    let mut cmd = Command::new(argv.first().copied().unwrap_or("/bin/bash"));
    if argv.is_empty() {
        cmd.arg("-l");
    } else {
        cmd.args(&argv[1..]);
    }
    cmd.env_clear()
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8");
    if interactive {
        if let Some(term) = std::env::var_os("TERM") {
            cmd.env("TERM", term);
        }
    } else {
        cmd.stdin(Stdio::null());
    }
    berth_backend_support::sandbox::maintain::run_in_image(root, &mut cmd)
        .with_context(|| format!("failed to run {} in the image", argv.first().copied().unwrap_or("a shell")))
}

fn list(images: &Images) -> Result<()> {
    let names = images.names();
    if names.is_empty() {
        println!(
            "no images in {} (create one with `berth image create NAME --suite bookworm`)",
            images.dir().display()
        );
        return Ok(());
    }
    println!("{:<20} {:>10} {:>9} {:<20} IN USE BY", "NAME", "GENERATION", "SIZE", "CREATED");
    for name in names {
        let info = match images.info(&name) {
            Ok(info) => info,
            Err(e) => {
                println!("{name:<20} broken: {e}");
                continue;
            }
        };
        let generation = info.generation.map_or("plain".to_owned(), |g| {
            let older = info.generations.len().saturating_sub(1);
            if older > 0 {
                format!("{g} (+{older})")
            } else {
                g.to_string()
            }
        });
        let size = format!("{} MiB", disk_usage(&info.root) >> 20);
        let created = info.created.map(format_time).unwrap_or_default();
        let users = if info.users.is_empty() {
            "-".to_owned()
        } else {
            format!("{} ({})", info.users.len(), info.users.join(", "))
        };
        println!("{:<20} {:>10} {:>9} {:<20} {}", info.name, generation, size, created, users);
    }
    Ok(())
}

fn format_time(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}
