//! The job resolver: `extends`, `!reference`, `default:` and `inherit:`
//! applied in GitLab's order, giving one [`PipelineJob`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use crate::include::merge_includes;
use crate::keywords::{allow_failure, commands, image_name, parallel, timeout, variables, Inherit, Instance};
use crate::rules::parse_rules;
use crate::yaml::{is_job_or_template, is_visible_job, kind, parse_document, scalar_string, Document, Position};
use crate::{JobList, PipelineError, PipelineJob, Variable};

/// Deepest `extends` chain accepted below a job, as in GitLab.
pub const MAX_EXTENDS_DEPTH: usize = 11;

/// Deepest chain of `!reference` tags pointing at values holding more of them.
const MAX_REFERENCE_DEPTH: usize = 10;

/// The stage of a job without `stage:`.
const DEFAULT_STAGE: &str = "test";

/// Deep-merges `over` into `base`: hashes merge recursively, anything else
/// in `over` replaces what `base` holds.
pub(crate) fn deep_merge(base: &mut Mapping, over: &Mapping) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(Value::Mapping(inner)), Value::Mapping(value)) => deep_merge(inner, value),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The parsed file, with the entries extended so far.
#[derive(Debug)]
pub(crate) struct Resolver<'a> {
    path: &'a Path,
    root: Mapping,
    /// Where the file's keys are.
    positions: HashMap<String, Position>,
    /// What loading the file had to say.
    pub(crate) warnings: Vec<String>,
    includes: bool,
    /// The top-level keys that come from included files, and which.
    pub(crate) origins: HashMap<String, String>,
    /// The includes not read.
    pub(crate) unread: Vec<String>,
    /// The included files read, with where their keys are written, and which
    /// top-level keys each defines.
    files: Vec<(PathBuf, HashMap<String, Position>)>,
    key_files: HashMap<String, usize>,
    /// Entries with `extends` merged, and how many levels of `extends` lie below them.
    extended: HashMap<String, (Value, usize)>,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(text: &str, path: &'a Path, files: crate::Files<'_>) -> Result<Self, PipelineError> {
        let Document { root, positions, mut warnings } = parse_document(text, path)?;
        let merged = merge_includes(root, path, positions.get("include").copied(), files)?;
        warnings.extend(merged.warnings);
        let includes = !merged.unread.is_empty();
        Ok(Resolver {
            path,
            root: merged.root,
            positions,
            warnings,
            includes,
            origins: merged.origins,
            unread: merged.unread,
            files: merged.files,
            key_files: merged.key_files,
            extended: HashMap::new(),
        })
    }

    /// Where the keyword `key` (a label like `image`, `default:image` or
    /// `variables (top-level)`) of `job` is written; else the job.
    /// The file the keyword `key` of `job` is written in (an included one,
    /// for a job or template defined there), and where in it.
    fn located(&self, job: &str, key: &str) -> (PathBuf, Option<Position>) {
        let place = match key.strip_suffix(" (top-level)") {
            Some(global) => global.to_owned(),
            None if key.starts_with("default:") => key.to_owned(),
            None => format!("{job}:{key}"),
        };
        let top = place.split(':').next().unwrap_or(job);
        let (path, positions) = match self.key_files.get(top).and_then(|i| self.files.get(*i)) {
            Some((path, positions)) => (path.as_path(), positions),
            None => (self.path, &self.positions),
        };
        (path.to_owned(), [place.as_str(), job].iter().find_map(|k| positions.get(*k).copied()))
    }

    fn invalid(&self, job: &str, key: &str, message: impl Into<String>) -> PipelineError {
        let (path, at) = self.located(job, key);
        PipelineError::Invalid { path, at, job: job.to_owned(), key: key.to_owned(), message: message.into() }
    }

    /// The visible, non-trigger jobs of the file, in file order.
    fn runnable(&mut self) -> Vec<String> {
        let candidates: Vec<String> = self
            .root
            .iter()
            .filter(|(_, value)| value.is_mapping())
            .filter_map(|(key, _)| key.as_str())
            .filter(|name| is_visible_job(name))
            .map(str::to_owned)
            .collect();
        candidates
            .into_iter()
            .filter(|name| match self.extend(name, &mut vec![name.clone()]) {
                Ok(Value::Mapping(job)) => !job.contains_key("trigger"),
                _ => true,
            })
            .collect()
    }

    /// The jobs `parallel:` makes of `name`; `None` without `parallel:`.
    fn instances(&mut self, name: &str) -> Result<Option<Vec<Instance>>, PipelineError> {
        let Value::Mapping(own) = self.extend(name, &mut vec![name.to_owned()])? else { return Ok(None) };
        match self.field(&own, "parallel", name, "parallel")? {
            None => Ok(None),
            Some(value) => parallel(name, &value).map(Some).map_err(|message| self.invalid(name, "parallel", message)),
        }
    }

    /// The jobs, where they come from, and what was not read.
    pub(crate) fn list(&mut self) -> Result<JobList, PipelineError> {
        let jobs = self.job_names();
        let included = self
            .runnable()
            .into_iter()
            .filter_map(|name| self.origins.get(&name).map(|file| (name, file.clone())))
            .collect();
        Ok(JobList { jobs, included, unread_includes: self.unread.clone(), warnings: self.warnings.clone() })
    }

    /// The names of the jobs GitLab would create: a job with `parallel:`
    /// gives its instances instead of itself.
    pub(crate) fn job_names(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        for name in self.runnable() {
            match self.instances(&name) {
                Ok(Some(instances)) => names.extend(instances.into_iter().map(|i| i.name)),
                _ => names.push(name),
            }
        }
        names
    }

    /// The entry `name` with its `extends` merged in; `chain` holds the
    /// entries being extended, `name` last.
    fn extend(&mut self, name: &str, chain: &mut Vec<String>) -> Result<Value, PipelineError> {
        if let Some((done, height)) = self.extended.get(name) {
            // A cached entry skips the walk below it: check its depth here.
            if chain.len() - 1 + height > MAX_EXTENDS_DEPTH {
                let (path, at) = self.located(&chain[0], "extends");
                return Err(PipelineError::ExtendsTooDeep { path, at, job: chain[0].clone(), chain: chain.clone() });
            }
            return Ok(done.clone());
        }
        let Some(Value::Mapping(own)) = self.root.get(name) else {
            return Ok(self.root.get(name).cloned().unwrap_or(Value::Null));
        };
        let own = own.clone();
        let bases = match own.get("extends") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(base)) => vec![base.clone()],
            Some(Value::Sequence(items)) => {
                items.iter().map(|item| item.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>().ok_or_else(
                    || {
                        self.invalid(
                            &chain[0],
                            "extends",
                            format!("`{name}` extends a list holding something other than names"),
                        )
                    },
                )?
            }
            Some(other) => {
                return Err(self.invalid(
                    &chain[0],
                    "extends",
                    format!("`{name}` extends {}; use a name or a list of names", kind(other)),
                ))
            }
        };
        let mut merged = Mapping::new();
        let mut height = 0;
        for base in bases {
            let exists = is_job_or_template(&base) && self.root.contains_key(base.as_str());
            if !exists {
                let (path, at) = self.located(name, "extends");
                return Err(PipelineError::ExtendsMissing {
                    path,
                    at,
                    job: name.to_owned(),
                    missing: base,
                    includes: self.includes,
                });
            }
            if chain.contains(&base) {
                let mut cycle = chain.clone();
                cycle.push(base);
                let (path, at) = self.located(&chain[0], "extends");
                return Err(PipelineError::ExtendsCycle { path, at, job: chain[0].clone(), chain: cycle });
            }
            chain.push(base.clone());
            if chain.len() > MAX_EXTENDS_DEPTH + 1 {
                let (path, at) = self.located(&chain[0], "extends");
                return Err(PipelineError::ExtendsTooDeep { path, at, job: chain[0].clone(), chain: chain.clone() });
            }
            let extended = self.extend(&base, chain)?;
            chain.pop();
            let base_height = self.extended.get(&base).map_or(0, |(_, h)| *h);
            height = height.max(base_height + 1);
            match extended {
                Value::Mapping(extended) => deep_merge(&mut merged, &extended),
                other => {
                    return Err(self.invalid(
                        &chain[0],
                        "extends",
                        format!("`{name}` extends `{base}`, which is {} instead of a hash of keywords", kind(&other)),
                    ))
                }
            }
        }
        deep_merge(&mut merged, &own);
        merged.shift_remove("extends");
        let merged = Value::Mapping(merged);
        self.extended.insert(name.to_owned(), (merged.clone(), height));
        Ok(merged)
    }

    /// `value` with every `!reference` tag replaced by what it points at.
    fn expand(
        &mut self,
        value: &Value,
        job: &str,
        key: &str,
        stack: &mut Vec<Vec<String>>,
    ) -> Result<Value, PipelineError> {
        match value {
            Value::Tagged(tagged) => {
                if tagged.tag != "reference" {
                    return Err(self.invalid(
                        job,
                        key,
                        format!("the YAML tag `{}` is not supported; only `!reference` is", tagged.tag),
                    ));
                }
                let reference = match &tagged.value {
                    Value::Sequence(items) if !items.is_empty() => {
                        items.iter().map(|item| item.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>()
                    }
                    _ => None,
                }
                .ok_or_else(|| {
                    self.invalid(job, key, "`!reference` must be a list of names, like `!reference [.setup, script]`")
                })?;
                let (path, at) = self.located(job, key);
                let bad = |message: &str, includes: bool| PipelineError::BadReference {
                    path: path.clone(),
                    at,
                    job: job.to_owned(),
                    reference: reference.clone(),
                    message: message.to_owned(),
                    includes,
                };
                if stack.contains(&reference) {
                    return Err(bad("is part of a cycle of references; break the cycle", false));
                }
                if stack.len() >= MAX_REFERENCE_DEPTH {
                    return Err(bad(
                        &format!(
                            "nests references more than {MAX_REFERENCE_DEPTH} deep; \
                             reference the values directly"
                        ),
                        false,
                    ));
                }
                stack.push(reference.clone());
                let target = self.lookup(&reference, job, key, stack);
                let expanded = target.and_then(|target| self.expand(&target, job, key, stack));
                stack.pop();
                expanded
            }
            Value::Mapping(mapping) => {
                let mut out = Mapping::with_capacity(mapping.len());
                for (k, v) in mapping {
                    out.insert(k.clone(), self.expand(v, job, key, stack)?);
                }
                Ok(Value::Mapping(out))
            }
            Value::Sequence(items) => items
                .iter()
                .map(|item| self.expand(item, job, key, stack))
                .collect::<Result<_, _>>()
                .map(Value::Sequence),
            other => Ok(other.clone()),
        }
    }

    /// The value a `!reference` points at, in the extended file.
    fn lookup(
        &mut self,
        reference: &[String],
        job: &str,
        key: &str,
        stack: &mut Vec<Vec<String>>,
    ) -> Result<Value, PipelineError> {
        let (path, at) = self.located(job, key);
        let bad = |message: String, includes: bool| PipelineError::BadReference {
            path: path.clone(),
            at,
            job: job.to_owned(),
            reference: reference.to_vec(),
            message,
            includes,
        };
        let entry = &reference[0];
        if !self.root.contains_key(entry.as_str()) {
            return Err(bad(format!("points at `{entry}`, which is not defined in this file"), self.includes));
        }
        let mut current = if is_job_or_template(entry) {
            self.extend(entry, &mut vec![entry.clone()])?
        } else {
            self.root[entry.as_str()].clone()
        };
        for (depth, step) in reference.iter().enumerate().skip(1) {
            if let Value::Tagged(_) = current {
                current = self.expand(&current, job, key, stack)?;
            }
            let parent = reference[..depth].join(":");
            current = match current {
                Value::Mapping(mut mapping) => mapping
                    .swap_remove(step.as_str())
                    .ok_or_else(|| bad(format!("points at `{step}`, but `{parent}` has no such key"), false))?,
                other => {
                    return Err(bad(
                        format!("looks up `{step}` in `{parent}`, which is {} instead of a hash", kind(&other)),
                        false,
                    ))
                }
            };
        }
        Ok(current)
    }

    /// `key` of `mapping`, references expanded; `None` when absent or null.
    fn field(&mut self, mapping: &Mapping, key: &str, job: &str, label: &str) -> Result<Option<Value>, PipelineError> {
        match mapping.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match self.expand(value, job, label, &mut Vec::new())? {
                Value::Null => Ok(None),
                value => Ok(Some(value)),
            },
        }
    }

    /// The top-level keyword `key`, references expanded; `None` when absent or null.
    fn global(&mut self, key: &str, job: &str, label: &str) -> Result<Option<Value>, PipelineError> {
        let mut holder = Mapping::new();
        if let Some(value) = self.root.get(key) {
            holder.insert(Value::from(key), value.clone());
        }
        self.field(&holder, key, job, label)
    }

    /// The value of `key` for the job: the job's own, else `default:`'s if
    /// inherited, else the legacy global keyword if `legacy`. Returns the
    /// value with the label naming where it came from.
    fn inherited(
        &mut self,
        own: &Mapping,
        default: &Mapping,
        inherit: &Inherit,
        key: &str,
        legacy: bool,
        job: &str,
    ) -> Result<Option<(Value, String)>, PipelineError> {
        if let Some(value) = self.field(own, key, job, key)? {
            return Ok(Some((value, key.to_owned())));
        }
        if !inherit.allows(key) {
            return Ok(None);
        }
        let label = format!("default:{key}");
        if let Some(value) = self.field(default, key, job, &label)? {
            return Ok(Some((value, label)));
        }
        if legacy {
            let label = format!("{key} (top-level)");
            if let Some(value) = self.global(key, job, &label)? {
                return Ok(Some((value, label)));
            }
        }
        Ok(None)
    }

    /// The job named `name`: a job of the file, or one `parallel:` makes.
    pub(crate) fn job(&mut self, name: &str) -> Result<PipelineJob, PipelineError> {
        let no_such_job = |this: &mut Self| PipelineError::NoSuchJob {
            path: this.path.to_owned(),
            job: name.to_owned(),
            available: this.job_names(),
            includes: this.includes,
        };
        if is_visible_job(name) && self.root.contains_key(name) {
            if self.instances(name)?.is_some() {
                // GitLab creates only the instances.
                return Err(no_such_job(self));
            }
            return self.resolve(name);
        }
        for base in self.runnable() {
            let instances = match self.instances(&base) {
                Ok(Some(instances)) => instances,
                // A bad `parallel:` is worth saying when the name is one it would make.
                Err(e) if name.starts_with(&format!("{base} ")) || name.starts_with(&format!("{base}: ")) => {
                    return Err(e)
                }
                _ => continue,
            };
            if let Some(instance) = instances.into_iter().find(|i| i.name == name) {
                let mut job = self.resolve(&base)?;
                job.name = instance.name;
                job.node = Some((instance.index, instance.total));
                for variable in instance.variables {
                    match job.variables.iter_mut().find(|existing| existing.name == variable.name) {
                        Some(slot) => *slot = variable,
                        None => job.variables.push(variable),
                    }
                }
                return Ok(job);
            }
        }
        Err(no_such_job(self))
    }

    /// The job `name` of the file, resolved.
    fn resolve(&mut self, name: &str) -> Result<PipelineJob, PipelineError> {
        let own = match self.extend(name, &mut vec![name.to_owned()])? {
            Value::Mapping(own) => own,
            other => {
                return Err(self.invalid(
                    name,
                    "",
                    format!("the job is {}, but a job is a hash of keywords like `script:`", kind(&other)),
                ))
            }
        };
        if own.contains_key("trigger") {
            return Err(self.invalid(
                name,
                "trigger",
                "this is a trigger job, which starts a downstream pipeline instead of \
                 running a script; `berth exec` can only run jobs with `script:`",
            ));
        }

        let (inherit_default, inherit_variables) = match self.field(&own, "inherit", name, "inherit")? {
            None => (Inherit::All, Inherit::All),
            Some(Value::Mapping(inherit)) => {
                if let Some(key) = inherit.keys().find(|key| !matches!(key.as_str(), Some("default" | "variables"))) {
                    return Err(self.invalid(
                        name,
                        "inherit",
                        format!(
                            "unknown key `{}`; the known keys are default and variables",
                            scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                        ),
                    ));
                }
                let parse = |key: &str| {
                    Inherit::parse(inherit.get(key))
                        .map_err(|message| self.invalid(name, &format!("inherit:{key}"), message))
                };
                (parse("default")?, parse("variables")?)
            }
            Some(other) => {
                return Err(self.invalid(
                    name,
                    "inherit",
                    format!("must be a hash with `default:` and/or `variables:`, not {}", kind(&other)),
                ))
            }
        };

        let default = match self.global("default", name, "default")? {
            None => Mapping::new(),
            Some(Value::Mapping(default)) => default,
            Some(other) => {
                return Err(self.invalid(name, "default", format!("must be a hash of keywords, not {}", kind(&other))))
            }
        };

        let stage = match self.field(&own, "stage", name, "stage")? {
            None => DEFAULT_STAGE.to_owned(),
            Some(Value::String(stage)) if !stage.is_empty() => stage,
            Some(other) => {
                return Err(self.invalid(name, "stage", format!("must be a stage name, not {}", kind(&other))))
            }
        };

        let image = match self.inherited(&own, &default, &inherit_default, "image", true, name)? {
            None => None,
            Some((value, label)) => Some(image_name(&value).map_err(|message| self.invalid(name, &label, message))?),
        };

        let mut scripts = Vec::new();
        for key in ["before_script", "after_script"] {
            scripts.push(match self.inherited(&own, &default, &inherit_default, key, true, name)? {
                None => Vec::new(),
                Some((value, label)) => commands(&value).map_err(|message| self.invalid(name, &label, message))?,
            });
        }
        let after_script = scripts.pop().unwrap_or_default();
        let before_script = scripts.pop().unwrap_or_default();

        let script = match self.field(&own, "script", name, "script")? {
            None => {
                let hint = if self.includes {
                    "; its template may be in an `include:` that `berth exec` does not read \
                     (`berth exec --list` names them, and where to put a copy for --include-dir)"
                } else {
                    ""
                };
                return Err(self.invalid(
                    name,
                    "script",
                    format!("the job has no `script:`; add one (or `extends:` a template that has one){hint}"),
                ));
            }
            Some(value) => commands(&value).map_err(|message| self.invalid(name, "script", message))?,
        };
        if script.is_empty() {
            return Err(self.invalid(name, "script", "the job's `script:` is empty; add a command"));
        }

        let timeout_secs = match self.inherited(&own, &default, &inherit_default, "timeout", false, name)? {
            None => None,
            Some((value, label)) => Some(timeout(&value).map_err(|message| self.invalid(name, &label, message))?),
        };

        let (allow_failure, allow_failure_exit_codes) =
            match self.field(&own, "allow_failure", name, "allow_failure")? {
                Some(value) => allow_failure(&value).map_err(|message| self.invalid(name, "allow_failure", message))?,
                None => {
                    let manual = self.field(&own, "when", name, "when")? == Some(Value::String("manual".to_owned()));
                    (manual && !own.contains_key("rules"), Vec::new())
                }
            };

        let rules = match self.field(&own, "rules", name, "rules")? {
            None => None,
            Some(value) => Some(parse_rules(&value).map_err(|message| self.invalid(name, "rules", message))?),
        };

        let global_variables = self.global("variables", name, "variables (top-level)")?;
        let mut all_variables: Vec<Variable> = match global_variables {
            None => Vec::new(),
            Some(value) => variables(&value)
                .map_err(|message| self.invalid(name, "variables (top-level)", message))?
                .into_iter()
                .filter(|variable| inherit_variables.allows(&variable.name))
                .collect(),
        };
        if let Some(value) = self.field(&own, "variables", name, "variables")? {
            let job_variables = variables(&value).map_err(|message| self.invalid(name, "variables", message))?;
            for variable in job_variables {
                match all_variables.iter_mut().find(|existing| existing.name == variable.name) {
                    Some(slot) => *slot = variable,
                    None => all_variables.push(variable),
                }
            }
        }

        Ok(PipelineJob {
            name: name.to_owned(),
            stage,
            image,
            variables: all_variables,
            before_script,
            script,
            after_script,
            timeout_secs,
            allow_failure,
            allow_failure_exit_codes,
            node: None,
            rules,
            warnings: self.warnings.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
