//! `berth-package-assets OUT_DIR`: writes the files of berth's Debian package
//! that are generated from its command line: a man page per command and
//! subcommand (`OUT_DIR/man/berth.1`, `berth-image-create.1`, ...) and the
//! bash, zsh and fish completions (`OUT_DIR/completions/`).
//!
//! A program of its own so that the `berth` binary, started a dozen times per
//! job, carries no generator. `scripts/package` runs it before `cargo deb`;
//! `runner-cli/Cargo.toml` (`[package.metadata.deb]`) says where the files go.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// The shells completions are written for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

fn main() -> Result<()> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [out] = args.as_slice() else {
        bail!("usage: berth-package-assets OUT_DIR (writes OUT_DIR/man and OUT_DIR/completions)");
    };
    for path in write_all(Path::new(out))? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes the man pages into `out/man` and the completions into
/// `out/completions`, replacing what an earlier run left there; the files written.
fn write_all(out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = man_pages(&fresh_dir(&out.join("man"))?)?;
    written.extend(completions(&fresh_dir(&out.join("completions"))?)?);
    Ok(written)
}

/// `dir`, created empty: a page of a subcommand that no longer exists must not be packaged.
fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to remove {}", dir.display())),
    }
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    Ok(dir.to_owned())
}

/// One page per command, named after its path: `berth.1`, `berth-image.1`,
/// `berth-image-create.1`, ... (the walk of clap_mangen's `generate_to`, with
/// every page's footer naming berth and its version rather than the subcommand).
fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    fn generate(cmd: clap::Command, source: &str, dir: &Path, pages: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            generate(sub, source, dir, pages)?;
        }
        pages.push(clap_mangen::Man::new(cmd).source(source).generate_to(dir)?);
        Ok(())
    }
    let mut cmd = berth::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("berth {}", cmd.get_version().unwrap_or_default());
    let mut pages = Vec::new();
    generate(cmd, &source, dir, &mut pages)
        .with_context(|| format!("failed to write the man pages into {}", dir.display()))?;
    pages.sort();
    Ok(pages)
}

/// `berth.bash`, `_berth` and `berth.fish`.
fn completions(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = berth::cli::Cli::command();
    SHELLS
        .iter()
        .map(|shell| {
            clap_complete::generate_to(*shell, &mut cmd, "berth", dir)
                .with_context(|| format!("failed to write the {shell} completion into {}", dir.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command berth has, with its page's name (`berth-image-create`).
    fn commands() -> Vec<(String, clap::Command)> {
        fn walk(prefix: &str, cmd: &clap::Command, all: &mut Vec<(String, clap::Command)>) {
            let name =
                if prefix.is_empty() { cmd.get_name().to_owned() } else { format!("{prefix}-{}", cmd.get_name()) };
            all.push((name.clone(), cmd.clone()));
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
                walk(&name, sub, all);
            }
        }
        let mut cmd = berth::cli::Cli::command();
        cmd.build();
        let mut all = Vec::new();
        walk("", &cmd, &mut all);
        all
    }

    /// A page's text with roff's escaped hyphens and apostrophes plain, as `man` shows them.
    fn page(dir: &Path, name: &str) -> String {
        let path = dir.join(format!("man/{name}.1"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.replace("\\-", "-").replace("\\*(Aq", "'")
    }

    #[test]
    fn every_command_and_subcommand_gets_a_page_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("man")).unwrap();
        std::fs::write(dir.path().join("man/berth-gone.1"), "a page of an earlier run").unwrap();
        write_all(dir.path()).unwrap();
        let mut want: Vec<String> = commands().into_iter().map(|(name, _)| format!("{name}.1")).collect();
        want.sort();
        let mut got: Vec<String> = std::fs::read_dir(dir.path().join("man"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, want);
        for name in ["berth.1", "berth-prepare.1", "berth-reap.1", "berth-image.1", "berth-image-create.1"] {
            assert!(got.iter().any(|g| g == name), "no page {name}: {got:?}");
        }
    }

    #[test]
    fn a_page_names_its_command_and_describes_its_options_and_arguments() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path()).unwrap();
        for (name, cmd) in commands() {
            let text = page(dir.path(), &name);
            assert!(text.contains(&format!("{name} - ")), "{name}.1 has no NAME line: {text}");
            if let Some(about) = cmd.get_about() {
                assert!(text.contains(&about.to_string()), "{name}.1 lacks its description {about:?}: {text}");
            }
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    assert!(text.contains(&format!("--{long}")), "{name}.1 does not mention --{long}: {text}");
                    if let Some(help) = arg.get_long_help().or(arg.get_help()) {
                        assert!(text.contains(&help.to_string()), "{name}.1 lacks the help of --{long}: {text}");
                    }
                } else if arg.is_positional() {
                    let value = arg.get_value_names().and_then(|v| v.first()).map_or(arg.get_id().as_str(), |v| v);
                    assert!(text.contains(value), "{name}.1 does not mention {value}: {text}");
                }
            }
        }
        // Spot checks, against pages that would be empty shells.
        let create = page(dir.path(), "berth-image-create");
        for needle in ["--suite", "--mirror", "--tool", "mmdebstrap", "--config"] {
            assert!(create.contains(needle), "berth-image-create.1 lacks {needle}: {create}");
        }
        // The footer names berth (the crates share the workspace's version), not the subcommand.
        assert!(create.contains(&format!("\"berth {}\"", env!("CARGO_PKG_VERSION"))), "{create}");
        assert!(page(dir.path(), "berth-reap").contains("--grace"));
        assert!(page(dir.path(), "berth-image").contains("--images-dir"));
    }

    #[test]
    fn completions_for_bash_zsh_and_fish_offer_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(dir.path()).unwrap();
        let completions = dir.path().join("completions");
        for file in ["berth.bash", "_berth", "berth.fish"] {
            let path = completions.join(file);
            assert!(written.contains(&path), "{} not reported among {written:?}", path.display());
            let text = std::fs::read_to_string(&path).unwrap();
            for (name, cmd) in commands().iter().skip(1) {
                let word = cmd.get_name();
                assert!(text.contains(word), "{file} does not offer {word} ({name})");
            }
            for option in ["config", "runner", "grace", "suite"] {
                // fish says `-l config`, bash and zsh `--config`.
                let option = if file.ends_with(".fish") { format!("-l {option}") } else { format!("--{option}") };
                assert!(text.contains(&option), "{file} does not offer {option}");
            }
        }
    }

    #[test]
    fn a_missing_output_directory_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b");
        assert!(!write_all(&out).unwrap().is_empty());
        assert!(out.join("man/berth.1").exists());
    }
}
