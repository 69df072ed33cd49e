//! Choosing a job's root filesystem among the images the admin provides.
//!
//! A job's `image:` is untrusted input. It names an image only by its last
//! path component without tag or digest (`registry.example.com/ci/bookworm:latest`
//! → `bookworm`); that name must be a plain file name, match the runner's
//! `allowed_images` globs, and be a directory directly inside `images_dir`
//! (after resolving symlinks). Anything else is refused as a job failure with
//! the list of images the job may use.

use std::path::{Path, PathBuf};

use berth_backend_api::Failure;

/// The images a runner offers.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    allowed: Vec<glob::Pattern>,
    default: Option<String>,
}

/// A resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Its name (`bookworm`).
    pub name: String,
    /// Its root filesystem: the current generation (`NAME/generations/N`), or
    /// the image directory itself for a plain image. A job keeps using this
    /// path, untouched, until it ends, whatever `berth image` does meanwhile.
    pub root: PathBuf,
    /// The generation, for images managed by `berth image`.
    pub generation: Option<u64>,
}

/// The image name a job reference asks for: last path component, without
/// `@digest` and `:tag`.
pub fn image_name(reference: &str) -> &str {
    let reference = reference.split('@').next().unwrap_or(reference);
    let base = reference.rsplit('/').next().unwrap_or(reference);
    base.split(':').next().unwrap_or(base)
}

/// Whether `name` can name an image: 1-128 of letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ImageStore {
    /// The store at `dir` offering images matching `allowed` (globs; empty:
    /// all), with `default` for jobs without `image:`.
    pub fn new(dir: impl Into<PathBuf>, allowed: &[String], default: Option<String>) -> Result<Self, String> {
        let allowed = allowed
            .iter()
            .map(|glob| {
                glob::Pattern::new(glob).map_err(|e| format!("allowed_images: {glob:?} is not a valid glob: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(default) = &default {
            if !valid_name(default) {
                return Err(format!(
                    "default_image: {default:?} is not an image name (letters, digits, '.', '_', '-')"
                ));
            }
        }
        Ok(ImageStore { dir: dir.into(), allowed, default })
    }

    /// The directory images live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image of jobs without `image:` (`default_image`), if set.
    pub fn default_image(&self) -> Option<&str> {
        self.default.as_deref()
    }

    fn is_allowed(&self, name: &str) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|p| p.matches(name))
    }

    /// The images a job may use, sorted.
    pub fn available(&self) -> Vec<String> {
        let store = self.dir.canonicalize().ok();
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().canonicalize().is_ok_and(|p| p.is_dir() && p.parent() == store.as_deref()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n) && self.is_allowed(n))
            .collect();
        names.sort();
        names
    }

    fn refuse(&self, what: String) -> Failure {
        let available = self.available();
        let list = if available.is_empty() { "none (ask the runner's admin)".to_owned() } else { available.join(", ") };
        Failure::refused(format!("{what}; images this runner allows: {list}"))
    }

    /// The image for a job that asked for `reference` (its `image:`), or the default.
    pub fn resolve(&self, reference: Option<&str>) -> Result<Image, Failure> {
        let name = match reference.map(str::trim).filter(|r| !r.is_empty()) {
            Some(reference) => {
                let name = image_name(reference);
                if !valid_name(name) {
                    return Err(self.refuse(format!("image {reference:?} does not name an image")));
                }
                name.to_owned()
            }
            None => match &self.default {
                Some(default) => default.clone(),
                None => return Err(self.refuse("the job has no `image:` and this runner has no default_image".into())),
            },
        };
        if !self.is_allowed(&name) {
            return Err(self.refuse(format!("image {name:?} is not allowed on this runner")));
        }
        let candidate = self.dir.join(&name);
        let image_dir = match (candidate.canonicalize(), self.dir.canonicalize()) {
            (Ok(root), Ok(dir)) if root.parent() == Some(dir.as_path()) && root.is_dir() => root,
            (Ok(_), Ok(_)) => {
                return Err(self.refuse(format!("image {name:?} is not a directory of {}", self.dir.display())))
            }
            (_, Err(e)) => {
                return Err(Failure::system_with(
                    format!("failed to read the images directory {}", self.dir.display()),
                    e,
                ))
            }
            (Err(_), _) => return Err(self.refuse(format!("image {name:?} does not exist"))),
        };
        match crate::generations::current(&image_dir) {
            Ok(Some((generation, root))) => Ok(Image { name, root, generation: Some(generation) }),
            Ok(None) => Ok(Image { name, root: image_dir, generation: None }),
            Err(e) => Err(Failure::system(format!("image {name:?} is broken: {e} (see `berth image list`)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_last_component_without_tag_or_digest() {
        assert_eq!(image_name("registry.example.com/ci/bookworm:latest"), "bookworm");
        assert_eq!(image_name("registry.example.com:5000/ci/bookworm"), "bookworm");
        assert_eq!(image_name("bookworm@sha256:abcd"), "bookworm");
        assert_eq!(image_name("debian:12"), "debian");
        assert_eq!(image_name("../../etc"), "etc");
        assert_eq!(image_name("x/.."), "..");
    }

    fn store(allowed: &[&str], default: Option<&str>) -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["bookworm", "trixie", "secret-tools"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("not-a-dir"), "").unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("hostroot")).unwrap();
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        let store = ImageStore::new(dir.path(), &allowed, default.map(str::to_owned)).unwrap();
        (dir, store)
    }

    fn refusal(result: Result<Image, Failure>) -> String {
        match result {
            Err(Failure::Refused { message }) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn resolves_allowed_images_and_the_default() {
        let (dir, store) = store(&["bookworm", "trix*"], Some("bookworm"));
        let image = store.resolve(Some("registry.example.com/ci/trixie:latest")).unwrap();
        assert_eq!(image.name, "trixie");
        assert_eq!(image.root, dir.path().canonicalize().unwrap().join("trixie"));
        assert_eq!(image.generation, None);
        assert_eq!(store.resolve(None).unwrap().name, "bookworm");
        assert_eq!(store.resolve(Some("  ")).unwrap().name, "bookworm");
    }

    #[test]
    fn refuses_what_is_not_allowed_or_not_there_listing_what_is() {
        let (_dir, store) = store(&["bookworm", "trix*", "hostroot", "not-a-dir", "missing"], None);
        let message = refusal(store.resolve(Some("secret-tools")));
        assert!(message.contains("not allowed") && message.contains("bookworm, trixie"), "{message}");
        assert!(refusal(store.resolve(Some("missing"))).contains("does not exist"));
        assert!(refusal(store.resolve(Some("hostroot"))).contains("not a directory of"), "symlink out of the store");
        assert!(refusal(store.resolve(Some("not-a-dir"))).contains("not a directory"));
        assert!(refusal(store.resolve(Some("x/.."))).contains("does not name an image"));
        assert!(refusal(store.resolve(Some("-rf"))).contains("does not name an image"));
        assert!(refusal(store.resolve(None)).contains("no default_image"));
    }

    #[test]
    fn an_empty_allow_list_allows_every_image_of_the_store() {
        let (_dir, store) = store(&[], None);
        assert_eq!(store.available(), ["bookworm", "secret-tools", "trixie"]);
        assert!(store.resolve(Some("secret-tools")).is_ok());
    }

    #[test]
    fn bad_settings_are_reported() {
        assert!(ImageStore::new("/x", &["[".into()], None).unwrap_err().contains("allowed_images"));
        assert!(ImageStore::new("/x", &[], Some("../x".into())).unwrap_err().contains("default_image"));
    }
}
