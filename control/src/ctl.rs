//! `switchyard ctl`: the admin API from a terminal or a CD pipeline. Readable
//! tables by default, the API's JSON with `--json`. The admin address and
//! token come from flags or `SWITCHYARD_ADMIN` / `SWITCHYARD_TOKEN`; a token
//! is never taken from the command line alone in scripts (`--token-file`).

use std::fmt::Write as _;
use std::path::PathBuf;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN",
        default_value = "http://127.0.0.1:9901"
    )]
    pub admin: String,
    /// Bearer token.
    #[arg(
        long,
        env = "SWITCHYARD_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Routes with their backends and weights, and flags.
    Status,
    /// Change a route's weights.
    Weights {
        #[command(subcommand)]
        command: WeightsCommand,
    },
    /// Feature flags.
    Flag {
        #[command(subcommand)]
        command: FlagCommand,
    },
    /// Rolling-window stats of a route's backends.
    Stats {
        route: String,
        /// Every live replica's traffic merged (fleet mode), as a rollout's
        /// leader judges it; default: the replica asked.
        #[arg(long)]
        fleet: bool,
    },
    /// Fleet mode: the replicas, each rollout's leader, the store's health.
    Fleet,
    /// Progressive rollouts: start, status, promote, pause, resume, abort.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Drop what the API or a rollout set over the configuration file: a
    /// route's weights or a flag (NAME), or everything (no NAME); audited.
    Reset {
        /// A route or a flag; with neither --route nor --flag, whichever
        /// exists.
        name: Option<String>,
        /// NAME is a route.
        #[arg(long, requires = "name", conflicts_with = "flag")]
        route: bool,
        /// NAME is a flag.
        #[arg(long, requires = "name")]
        flag: bool,
    },
    /// The audit log.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum WeightsCommand {
    /// `weights set api blue=90 canary=10` (backends left out get 0).
    Set {
        route: String,
        /// BACKEND=PERCENT pairs.
        #[arg(required = true)]
        weights: Vec<String>,
        /// Only if the state is still at this version.
        #[arg(long)]
        if_match: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Phase, step, hold, last analysis with each check.
    Status {
        route: String,
        /// Keep watching, as `rollout watch`.
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this long (e.g. `10m`).
        #[arg(long, requires = "watch", value_parser = duration)]
        timeout: Option<std::time::Duration>,
    },
    /// A live view of the rollout, redrawn in place, until it ends. Exit
    /// status: 0 promoted, 2 rolled back, 3 aborted, 4 --timeout passed
    /// (1 the API refused or could not be reached): a CI pipeline can gate
    /// a deploy on it.
    Watch {
        route: String,
        /// Give up after this long (e.g. `10m`); default: never.
        #[arg(long, value_parser = duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Start a rollout: a canary of TARGET against STABLE from the flags, or
    /// any spec the API takes (blue-green, validation, thresholds, webhooks)
    /// from a file with -f.
    Start {
        route: String,
        /// The API's rollout spec, YAML or JSON (docs/rollouts.md); `-` reads
        /// standard input.
        #[arg(long, short = 'f', conflicts_with_all = ["stable", "target", "steps", "interval", "window", "min_requests"])]
        file: Option<PathBuf>,
        #[arg(long, required_unless_present = "file")]
        stable: Option<String>,
        #[arg(long, required_unless_present = "file")]
        target: Option<String>,
        /// WEIGHT:HOLD,... with the last step's hold left out, e.g.
        /// `5:30s,50:30s,100`. Default: 0.1:1h,1:4h,5:24h,25:48h,100.
        #[arg(long)]
        steps: Option<String>,
        #[command(flatten)]
        analysis: AnalysisArgs,
    },
    /// Jump to the last step and finish.
    Promote {
        route: String,
    },
    Pause {
        route: String,
    },
    Resume {
        route: String,
    },
    /// Stop and send the target's users back to stable.
    Abort {
        route: String,
    },
    /// Back to stable; after a blue-green promotion, to the standby colour.
    Rollback {
        route: String,
    },
    /// After a rollout ended (promoted, aborted, rolled back): back to the
    /// weights the route had before it started, audited.
    Undo {
        route: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FlagCommand {
    List,
    Get {
        name: String,
    },
    /// Create a flag or change the given fields of an existing one.
    Set {
        name: String,
        #[arg(long)]
        enabled: Option<bool>,
        /// Percent of users, up to two decimals.
        #[arg(long)]
        rollout: Option<f64>,
        /// Comma-separated target groups (replaces the list).
        #[arg(long)]
        groups: Option<String>,
        /// USER=true|false, repeatable; USER=clear removes an override.
        #[arg(long = "override")]
        overrides: Vec<String>,
        /// What the flag is for.
        #[arg(long)]
        description: Option<String>,
    },
    Delete {
        name: String,
    },
    /// A watched flag's cohorts side by side: on against off, and whether
    /// their error rates differ beyond noise.
    Stats {
        name: String,
    },
    /// Guarded rollouts of a flag's percentage: its on cohort judged against
    /// its off cohort, reverted (or killed) on a regression.
    Rollout {
        #[command(subcommand)]
        command: FlagRolloutCommand,
    },
}

/// The analysis settings `rollout start` takes as flags.
#[derive(Debug, Args)]
pub struct AnalysisArgs {
    /// Analysis interval (default 5s).
    #[arg(long)]
    interval: Option<String>,
    /// Analysis window (default 30s).
    #[arg(long)]
    window: Option<String>,
    /// Fewer requests in the window (to the target, in a flag's on cohort)
    /// is inconclusive (default 50).
    #[arg(long)]
    min_requests: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum FlagRolloutCommand {
    /// Start a guarded rollout of FLAG from the flags given, or any spec the
    /// API takes from a file with -f.
    Start {
        flag: String,
        /// The API's flag rollout spec, YAML or JSON (docs/flags.md); `-`
        /// reads standard input.
        #[arg(long, short = 'f', conflicts_with_all = ["steps", "interval", "window", "min_requests", "on_failure"])]
        file: Option<PathBuf>,
        /// PERCENT:HOLD,... with the last step's hold left out, e.g.
        /// `5:1m,25:1m,100`. Default: 0.1:1h,1:4h,5:24h,25:48h,100.
        #[arg(long)]
        steps: Option<String>,
        #[command(flatten)]
        analysis: AnalysisArgs,
        /// On a regression: `revert` to the starting percentage (default)
        /// or `kill` the flag (off for everyone).
        #[arg(long, value_parser = ["revert", "kill"])]
        on_failure: Option<String>,
    },
    /// Phase, step, hold, last analysis with each check.
    Status {
        flag: String,
        /// Keep watching, as `flag rollout watch`.
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this long (e.g. `10m`).
        #[arg(long, requires = "watch", value_parser = duration)]
        timeout: Option<std::time::Duration>,
    },
    /// A live view until the rollout ends; exit status as `rollout watch`
    /// (0 promoted, 2 rolled back, 3 aborted, 4 --timeout passed).
    Watch {
        flag: String,
        #[arg(long, value_parser = duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Jump to the last step's percentage and finish.
    Promote {
        flag: String,
    },
    Pause {
        flag: String,
    },
    Resume {
        flag: String,
    },
    /// Stop and go back to the starting percentage.
    Abort {
        flag: String,
    },
    /// Back to the starting percentage.
    Rollback {
        flag: String,
    },
    /// After the rollout ended: back to the flag as it was before it began.
    Undo {
        flag: String,
    },
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 30s or 10m: {e}"))
}

/// Runs a ctl command; returns the process exit status (0 ok, 1 refused or
/// unreachable, 64 bad arguments; `rollout watch` has its own).
pub async fn run(args: CtlArgs) -> u8 {
    let watched = match &args.command {
        CtlCommand::Rollout {
            command: RolloutCommand::Watch { route, timeout },
        }
        | CtlCommand::Rollout {
            command:
                RolloutCommand::Status {
                    route,
                    watch: true,
                    timeout,
                },
        } => Some((Rolled::Route(route), *timeout)),
        CtlCommand::Flag {
            command:
                FlagCommand::Rollout {
                    command:
                        FlagRolloutCommand::Watch { flag, timeout }
                        | FlagRolloutCommand::Status {
                            flag,
                            watch: true,
                            timeout,
                        },
                },
        } => Some((Rolled::Flag(flag), *timeout)),
        _ => None,
    };
    if let Some((rolled, timeout)) = watched {
        return match api(&args) {
            Ok(api) => watch::run(&api, rolled, timeout, args.json).await,
            Err(e) => report(e),
        };
    }
    report_result(execute(&args).await)
}

fn report(e: CtlError) -> u8 {
    report_result(Err(e))
}

fn report_result(result: Result<String, CtlError>) -> u8 {
    match result {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(CtlError::Usage(m)) => {
            eprintln!("switchyard ctl: {m}");
            64
        }
        Err(CtlError::Failed(m)) => {
            eprintln!("switchyard ctl: {m}");
            1
        }
    }
}

enum CtlError {
    Usage(String),
    Failed(String),
}

/// The admin API `args` name, with its token.
fn api(args: &CtlArgs) -> Result<Api, CtlError> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| CtlError::Usage(format!("--token-file {}: {e}", path.display())))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    Ok(Api {
        base: admin_base(&args.admin)?,
        token,
    })
}

async fn execute(args: &CtlArgs) -> Result<String, CtlError> {
    let api = api(args)?;
    let (value, table) = match &args.command {
        CtlCommand::Status => {
            let state = api.get("/v1/state").await?;
            let table = status_table(&state);
            (state, table)
        }
        CtlCommand::Weights {
            command:
                WeightsCommand::Set {
                    route,
                    weights,
                    if_match,
                },
        } => {
            let mut body = Map::new();
            for pair in weights {
                let (backend, pct) = pair
                    .split_once('=')
                    .ok_or_else(|| CtlError::Usage(format!("`{pair}` is not BACKEND=PERCENT")))?;
                let pct: f64 = pct
                    .parse()
                    .map_err(|_| CtlError::Usage(format!("`{pct}` in `{pair}` is not a number")))?;
                let pct = percent(&format!("the weight of `{backend}`"), pct)?;
                body.insert(backend.to_owned(), json!(pct));
            }
            let path = format!("/v1/routes/{route}/weights");
            let v = api
                .call(Method::PUT, &path, Some(Value::Object(body)), *if_match)
                .await?;
            let table = weights_line(&v, &bucket_order(&api, route).await);
            (v, table)
        }
        CtlCommand::Flag { command } => flag(&api, command).await?,
        CtlCommand::Rollout { command } => rollout(&api, command).await?,
        CtlCommand::Stats { route, fleet } => {
            let scope = if *fleet { "fleet" } else { "local" };
            let v = api
                .get(&format!("/v1/routes/{route}/stats?scope={scope}"))
                .await?;
            let table = stats_table(&v);
            (v, table)
        }
        CtlCommand::Reset { name, route, flag } => {
            let path = match name {
                None => "/v1/overrides".to_owned(),
                Some(name) => {
                    let kind = match (route, flag) {
                        (true, _) => "routes",
                        (_, true) => "flags",
                        _ => reset_kind(&api, name).await?,
                    };
                    format!("/v1/overrides/{kind}/{name}")
                }
            };
            let v = api.call(Method::DELETE, &path, None, None).await?;
            let table = format!(
                "back to the configuration file's values ({})\n{}",
                name.as_deref().unwrap_or("everything"),
                overridden_line(&v["overridden"])
            );
            (v, table)
        }
        CtlCommand::Fleet => {
            let v = api.get("/v1/fleet").await?;
            let table = fleet_table(&v);
            (v, table)
        }
        CtlCommand::Events { after, limit } => {
            let v = api
                .get(&format!("/v1/events?after={after}&limit={limit}"))
                .await?;
            let table = events_table(&v);
            (v, table)
        }
    };
    Ok(if args.json {
        format!("{}\n", serde_json::to_string_pretty(&value).expect("JSON"))
    } else {
        table
    })
}

/// Whether `name` names a route or a flag whose values are overridden.
async fn reset_kind(api: &Api, name: &str) -> Result<&'static str, CtlError> {
    let state = api.get("/v1/state").await?;
    let listed = |kind: &str| {
        state["overridden"][kind]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n == name))
    };
    match (listed("routes"), listed("flags")) {
        (true, true) => Err(CtlError::Usage(format!(
            "`{name}` is both a route and a flag set over the file: say --route or --flag"
        ))),
        (true, false) => Ok("routes"),
        (false, true) => Ok("flags"),
        (false, false) => Err(CtlError::Failed(format!(
            "`{name}`: no route's weights or flag of that name are set over the configuration file"
        ))),
    }
}

/// `still set over the file: routes a, b; flags c` (or that nothing is).
fn overridden_line(overridden: &Value) -> String {
    let list = |kind: &str| -> Vec<String> {
        overridden[kind]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect()
    };
    let (routes, flags) = (list("routes"), list("flags"));
    if routes.is_empty() && flags.is_empty() {
        return "nothing is set over the configuration file\n".into();
    }
    let mut parts = Vec::new();
    if !routes.is_empty() {
        parts.push(format!("weights of {}", routes.join(", ")));
    }
    if !flags.is_empty() {
        parts.push(format!("flags {}", flags.join(", ")));
    }
    format!(
        "set over the configuration file (its edits to these do not apply; `switchyard ctl reset NAME` returns to them): {}\n",
        parts.join("; ")
    )
}

/// A rollout spec file (YAML or JSON; `-`: standard input) as the API's
/// JSON body.
fn spec_file(file: &std::path::Path) -> Result<Value, CtlError> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| CtlError::Usage(format!("-f {}: {e}", file.display())))?;
    let spec: Value = serde_saphyr::from_str(&text)
        .map_err(|e| CtlError::Usage(format!("-f {}: not YAML or JSON: {e}", file.display())))?;
    if !spec.is_object() {
        return Err(CtlError::Usage(format!(
            "-f {}: a rollout spec is a mapping (stable, target, steps, ...)",
            file.display()
        )));
    }
    Ok(spec)
}

/// `--admin` as a base URL, or what is wrong with it in the user's terms.
fn admin_base(admin: &str) -> Result<String, CtlError> {
    let base = admin.trim().trim_end_matches('/');
    let usage = |why: String| Err(CtlError::Usage(format!("--admin `{admin}`: {why}")));
    match base.split_once("://") {
        None => usage(format!(
            "no scheme; did you mean `http://{base}`? (or set SWITCHYARD_ADMIN)"
        )),
        Some(("https", _)) => usage(
            "ctl speaks plain HTTP to the admin listener (which does not serve TLS); give its http:// address".into(),
        ),
        Some(("http", rest)) => match rest.parse::<http::uri::Authority>() {
            Ok(_) if !rest.contains('/') => Ok(base.to_owned()),
            _ => usage("expected http://HOST:PORT, e.g. http://127.0.0.1:9901".into()),
        },
        Some((scheme, _)) => usage(format!("scheme `{scheme}` is not http")),
    }
}

/// A percentage given on the command line: 0 to 100, at most two decimals
/// (the split's resolution).
fn percent(what: &str, value: f64) -> Result<f64, CtlError> {
    let hundredths = value * 100.0;
    if !(0.0..=100.0).contains(&value) || (hundredths - hundredths.round()).abs() > 1e-6 {
        return Err(CtlError::Usage(format!(
            "{what} must be a percentage from 0 to 100 with at most two decimals, not {value}"
        )));
    }
    Ok(value)
}

async fn flag(api: &Api, command: &FlagCommand) -> Result<(Value, String), CtlError> {
    Ok(match command {
        FlagCommand::List => {
            let v = api.get("/v1/flags").await?;
            let table = flags_table(v["flags"].as_array().map_or(&[][..], |a| a.as_slice()));
            (v, table)
        }
        FlagCommand::Get { name } => {
            let v = api.get(&format!("/v1/flags/{name}")).await?;
            let table = flags_table(std::slice::from_ref(&v));
            (v, table)
        }
        FlagCommand::Set {
            name,
            enabled,
            rollout,
            groups,
            overrides,
            description,
        } => {
            let mut patch = Map::new();
            if let Some(d) = description {
                patch.insert("description".into(), json!(d));
            }
            if let Some(e) = enabled {
                patch.insert("enabled".into(), json!(e));
            }
            if let Some(r) = rollout {
                patch.insert(
                    "rollout_percentage".into(),
                    json!(percent("--rollout", *r)?),
                );
            }
            if let Some(g) = groups {
                let list: Vec<&str> = g
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                patch.insert("target_groups".into(), json!(list));
            }
            let mut over = Map::new();
            for pair in overrides {
                let (user, value) = pair.split_once('=').ok_or_else(|| {
                    CtlError::Usage(format!("`{pair}` is not USER=true|false|clear"))
                })?;
                let value = match value {
                    "true" => json!(true),
                    "false" => json!(false),
                    "clear" => Value::Null,
                    other => {
                        return Err(CtlError::Usage(format!(
                            "`{other}` is not true, false or clear"
                        )))
                    }
                };
                over.insert(user.to_owned(), value);
            }
            if !over.is_empty() {
                patch.insert("overrides".into(), Value::Object(over));
            }
            let path = format!("/v1/flags/{name}");
            let exists = match api.get(&path).await {
                Ok(_) => true,
                Err(CtlError::Failed(m)) if m.starts_with("404") => false,
                Err(e) => return Err(e),
            };
            let v = if exists {
                api.call(Method::PATCH, &path, Some(Value::Object(patch)), None)
                    .await?
            } else {
                // A new flag: clear-overrides mean nothing yet.
                if let Some(Value::Object(o)) = patch.get_mut("overrides") {
                    o.retain(|_, v| !v.is_null());
                }
                api.call(Method::PUT, &path, Some(Value::Object(patch)), None)
                    .await?
            };
            let table = flags_table(std::slice::from_ref(&v));
            (v, table)
        }
        FlagCommand::Stats { name } => {
            let v = api.get(&format!("/v1/flags/{name}/stats")).await?;
            let table = flag_stats_table(&v);
            (v, table)
        }
        FlagCommand::Delete { name } => {
            api.call(Method::DELETE, &format!("/v1/flags/{name}"), None, None)
                .await?;
            (json!({ "deleted": name }), format!("deleted flag {name}\n"))
        }
        FlagCommand::Rollout { command } => flag_rollout(api, command).await?,
    })
}

/// What a rollout command is about.
#[derive(Debug, Clone, Copy)]
enum Rolled<'a> {
    Route(&'a str),
    Flag(&'a str),
}

impl Rolled<'_> {
    /// `routes/NAME` or `flags/NAME`: the API's path and the audit target.
    fn path(self) -> String {
        match self {
            Rolled::Route(route) => format!("routes/{route}"),
            Rolled::Flag(flag) => format!("flags/{flag}"),
        }
    }

    fn url(self) -> String {
        format!("/v1/{}/rollout", self.path())
    }

    /// The backends in bucket order (a flag has none).
    async fn order(self, api: &Api) -> Vec<String> {
        match self {
            Rolled::Route(route) => bucket_order(api, route).await,
            Rolled::Flag(_) => Vec::new(),
        }
    }
}

/// The spec a rollout starts with from ctl's flags: `steps` as
/// `VALUE[:HOLD],...` under `step_key` (`weight`, `rollout_percentage`),
/// and the analysis given.
fn spec_from_flags(
    mut spec: Map<String, Value>,
    steps: Option<&str>,
    step_key: &str,
    analysis: &AnalysisArgs,
) -> Result<Value, CtlError> {
    if let Some(steps) = steps {
        let mut list = Vec::new();
        for item in steps.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (value, hold) = match item.split_once(':') {
                Some((v, h)) => (v, Some(h)),
                None => (item, None),
            };
            let value: f64 = value
                .parse()
                .map_err(|_| CtlError::Usage(format!("`{item}` is not PERCENT[:HOLD]")))?;
            let value = percent(&format!("the percentage of step `{item}`"), value)?;
            let mut step = Map::new();
            step.insert(step_key.into(), json!(value));
            if let Some(h) = hold {
                step.insert("hold".into(), json!(h));
            }
            list.push(Value::Object(step));
        }
        spec.insert("steps".into(), Value::Array(list));
    }
    let analysis: Map<String, Value> = [
        ("interval", analysis.interval.as_ref().map(|i| json!(i))),
        ("window", analysis.window.as_ref().map(|w| json!(w))),
        ("min_requests", analysis.min_requests.map(|m| json!(m))),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
    .collect();
    spec.insert("analysis".into(), Value::Object(analysis));
    Ok(Value::Object(spec))
}

/// `promote`, `pause`, … on `rolled`'s rollout.
async fn rollout_act(api: &Api, rolled: Rolled<'_>, action: &str) -> Result<Value, CtlError> {
    let url = format!("{}/{action}", rolled.url());
    api.call(Method::POST, &url, None, None).await
}

async fn flag_rollout(
    api: &Api,
    command: &FlagRolloutCommand,
) -> Result<(Value, String), CtlError> {
    use FlagRolloutCommand as C;
    let v = match command {
        C::Status { flag, .. } | C::Watch { flag, .. } => {
            api.get(&Rolled::Flag(flag).url()).await?
        }
        C::Start {
            flag,
            file: Some(file),
            ..
        } => {
            let spec = spec_file(file)?;
            api.call(Method::POST, &Rolled::Flag(flag).url(), Some(spec), None)
                .await?
        }
        C::Start {
            flag,
            file: None,
            steps,
            analysis,
            on_failure,
        } => {
            let mut spec = Map::new();
            if let Some(f) = on_failure {
                spec.insert("on_failure".into(), json!(f));
            }
            let spec = spec_from_flags(spec, steps.as_deref(), "rollout_percentage", analysis)?;
            api.call(Method::POST, &Rolled::Flag(flag).url(), Some(spec), None)
                .await?
        }
        C::Promote { flag } => rollout_act(api, Rolled::Flag(flag), "promote").await?,
        C::Pause { flag } => rollout_act(api, Rolled::Flag(flag), "pause").await?,
        C::Resume { flag } => rollout_act(api, Rolled::Flag(flag), "resume").await?,
        C::Abort { flag } => rollout_act(api, Rolled::Flag(flag), "abort").await?,
        C::Rollback { flag } => rollout_act(api, Rolled::Flag(flag), "rollback").await?,
        C::Undo { flag } => rollout_act(api, Rolled::Flag(flag), "undo").await?,
    };
    let table = rollout_table(&v, &[], false);
    Ok((v, table))
}

async fn rollout(api: &Api, command: &RolloutCommand) -> Result<(Value, String), CtlError> {
    let path = |route: &str| Rolled::Route(route).url();
    let v = match command {
        RolloutCommand::Status { route, .. } | RolloutCommand::Watch { route, .. } => {
            api.get(&path(route)).await?
        }
        RolloutCommand::Start {
            route,
            file: Some(file),
            ..
        } => {
            let spec = spec_file(file)?;
            api.call(Method::POST, &path(route), Some(spec), None)
                .await?
        }
        RolloutCommand::Start {
            route,
            file: None,
            stable,
            target,
            steps,
            analysis,
        } => {
            let spec = json!({ "strategy": "canary", "stable": stable, "target": target });
            let Value::Object(spec) = spec else {
                unreachable!("an object")
            };
            let spec = spec_from_flags(spec, steps.as_deref(), "weight", analysis)?;
            api.call(Method::POST, &path(route), Some(spec), None)
                .await?
        }
        RolloutCommand::Promote { route }
        | RolloutCommand::Pause { route }
        | RolloutCommand::Resume { route }
        | RolloutCommand::Rollback { route }
        | RolloutCommand::Undo { route }
        | RolloutCommand::Abort { route } => {
            let action = match command {
                RolloutCommand::Promote { .. } => "promote",
                RolloutCommand::Pause { .. } => "pause",
                RolloutCommand::Resume { .. } => "resume",
                RolloutCommand::Rollback { .. } => "rollback",
                RolloutCommand::Undo { .. } => "undo",
                _ => "abort",
            };
            rollout_act(api, Rolled::Route(route), action).await?
        }
    };
    let route = match command {
        RolloutCommand::Status { route, .. }
        | RolloutCommand::Watch { route, .. }
        | RolloutCommand::Start { route, .. }
        | RolloutCommand::Promote { route }
        | RolloutCommand::Pause { route }
        | RolloutCommand::Resume { route }
        | RolloutCommand::Abort { route }
        | RolloutCommand::Undo { route }
        | RolloutCommand::Rollback { route } => route,
    };
    let table = rollout_table(&v, &bucket_order(api, route).await, false);
    Ok((v, table))
}

/// A rollout as `rollout status` prints it; `paint`: verdicts and the
/// phase in colour (a terminal without NO_COLOR).
fn rollout_table(v: &Value, order: &[String], paint: bool) -> String {
    let steps = v["steps"].as_array().map_or(&[][..], |s| s.as_slice());
    let step = v["step"].as_u64().unwrap_or(0) as usize;
    let progressing = matches!(v["phase"].as_str(), Some("progressing" | "paused"));
    let flag = v["flag"].is_string();
    let mut out = String::new();
    if flag {
        let _ = writeln!(
            out,
            "flag {}: on cohort against off ({}; on failure: {})",
            text(&v["flag"]),
            colour(paint, &text(&v["phase"])),
            text(&v["on_failure"])
        );
    } else {
        let _ = writeln!(
            out,
            "route {}: {} -> {} ({})",
            text(&v["route"]),
            text(&v["stable"]),
            text(&v["target"]),
            colour(paint, &text(&v["phase"]))
        );
    }
    // `10% 20s > [25% 20s] > 50% 20s > 100%`: the current step in brackets.
    let list: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let hold = s["hold"]
                .as_str()
                .map_or(String::new(), |h| format!(" {h}"));
            let share = if flag {
                &s["rollout_percentage"]
            } else {
                &s["weight"]
            };
            let item = format!("{}%{hold}", text(share));
            if i == step && progressing {
                format!("[{item}]")
            } else {
                item
            }
        })
        .collect();
    let _ = writeln!(out, "steps {}", list.join(" > "));
    let share = if flag {
        &steps.get(step).unwrap_or(&Value::Null)["rollout_percentage"]
    } else {
        &v["target_weight"]
    };
    let _ = writeln!(
        out,
        "step {}/{} at {}%, held {} of {}",
        step + 1,
        steps.len(),
        text(share),
        text(&v["held"]),
        text(&v["hold"])
    );
    if flag {
        let _ = writeln!(
            out,
            "flag {} at {}%",
            if v["enabled"] == true {
                "on"
            } else {
                "off (killed)"
            },
            text(&v["rollout_percentage"])
        );
    } else {
        let _ = writeln!(out, "weights {}", weights_in(&v["weights"], order));
    }
    if !v["reason"].is_null() {
        let _ = writeln!(out, "reason: {}", text(&v["reason"]));
    }
    if let Some(a) = v["last_analysis"].as_object() {
        let (judged, baseline) = if flag {
            ("on", "off")
        } else {
            ("target", "stable")
        };
        let _ = writeln!(
            out,
            "\nlast analysis: {} ({judged} {} requests, {baseline} {})",
            colour(paint, &text(&a["verdict"])),
            text(&a["target_requests"]),
            text(&a["stable_requests"])
        );
        let rows: Vec<Vec<String>> = a["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let name = text(&c["check"]);
                let unit = crate::rollout::check_unit(&name);
                let value = c["value"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{x:.2}{unit}"));
                vec![
                    name.clone(),
                    value,
                    format!("{}{unit}", text(&c["threshold"])),
                    // Last in the row: its escape codes pad nothing after.
                    colour(paint, &text(&c["verdict"])),
                ]
            })
            .collect();
        out.push_str(&table(&["CHECK", "VALUE", "THRESHOLD", "VERDICT"], &rows));
        let d = &v["last_analysis"]["error_rate_difference"];
        if d.is_object() {
            let beyond = d["beyond_noise"] == true && d["z"].as_f64().is_some_and(|z| z > 0.0);
            let _ = writeln!(
                out,
                "on against off: {:+.2} points of errors (z = {:.2}), {}",
                d["points"].as_f64().unwrap_or(0.0),
                d["z"].as_f64().unwrap_or(0.0),
                if beyond {
                    "beyond noise: the flag's"
                } else {
                    "within noise: not the flag's"
                }
            );
        }
    }
    out
}

/// `word` in the colour of what it says (pass and promoted green, fail and
/// rolled-back red, the rest yellow), or as it is without `paint`.
fn colour(paint: bool, word: &str) -> String {
    if !paint {
        return word.to_owned();
    }
    let code = match word {
        "pass" | "promoted" => "32",
        "fail" | "rolled-back" | "aborted" => "31",
        _ => "33",
    };
    format!("\x1b[{code}m{word}\x1b[0m")
}

mod watch {
    //! `rollout watch`: the rollout redrawn in place (on a terminal) or
    //! printed again when it changes (in a pipeline's log), with a bar for
    //! the step's hold and the route's audit events since the watch began,
    //! until the rollout ends. Polls the API every second.

    use std::io::{IsTerminal, Write};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use super::{rollout_table, text, Api, CtlError, Rolled};

    pub const PROMOTED: u8 = 0;
    pub const ROLLED_BACK: u8 = 2;
    pub const ABORTED: u8 = 3;
    pub const TIMED_OUT: u8 = 4;

    pub async fn run(api: &Api, rolled: Rolled<'_>, timeout: Option<Duration>, json: bool) -> u8 {
        let terminal = std::io::stdout().is_terminal();
        let paint = terminal && std::env::var_os("NO_COLOR").is_none();
        let started = Instant::now();
        let order = rolled.order(api).await;
        let mut cursor = latest_event(api).await;
        let mut events: Vec<String> = Vec::new();
        let (mut drawn, mut last) = (0usize, String::new());
        loop {
            let rollout = match api.get(&rolled.url()).await {
                Ok(v) => v,
                Err(CtlError::Failed(m)) if m.starts_with("404") => {
                    eprintln!("switchyard ctl: {m}");
                    return 1;
                }
                Err(CtlError::Failed(m) | CtlError::Usage(m)) => {
                    // A proxy restarting mid-rollout: keep watching.
                    eprintln!("switchyard ctl: {m} (still watching)");
                    Value::Null
                }
            };
            if !rollout.is_null() {
                cursor = subject_events(api, rolled, cursor, &mut events).await;
                let view = if json {
                    format!("{}\n", rollout)
                } else {
                    render(&rollout, &order, &events, paint)
                };
                if terminal && !json {
                    // Up over the last drawing and clear to the end.
                    let up = if drawn > 0 {
                        format!("\x1b[{drawn}A\x1b[J")
                    } else {
                        String::new()
                    };
                    print!("{up}{view}");
                    drawn = view.lines().count();
                } else if view != last {
                    print!("{view}");
                    if !json {
                        println!();
                    }
                }
                let _ = std::io::stdout().flush();
                last = view;
                match rollout["phase"].as_str() {
                    Some("promoted") => return PROMOTED,
                    Some("rolled-back") => return ROLLED_BACK,
                    Some("aborted") => return ABORTED,
                    _ => {}
                }
            }
            if let Some(limit) = timeout {
                if started.elapsed() >= limit {
                    eprintln!(
                        "switchyard ctl: --timeout {} passed; the rollout is still {}",
                        humantime::format_duration(limit),
                        text(&rollout["phase"])
                    );
                    return TIMED_OUT;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn render(rollout: &Value, order: &[String], events: &[String], paint: bool) -> String {
        let mut out = rollout_table(rollout, order, paint);
        if let Some(bar) = hold_bar(rollout) {
            out.push_str(&format!("\nhold {bar}\n"));
        }
        if !events.is_empty() {
            out.push_str("\nevents since watching:\n");
            for e in events {
                out.push_str(&format!("  {e}\n"));
            }
        }
        out
    }

    /// `[########------------] 8s of 20s` for a progressing step's hold.
    fn hold_bar(rollout: &Value) -> Option<String> {
        if rollout["phase"] != "progressing" {
            return None;
        }
        let held = humantime::parse_duration(rollout["held"].as_str()?).ok()?;
        let hold = humantime::parse_duration(rollout["hold"].as_str()?).ok()?;
        let share = if hold.is_zero() {
            1.0
        } else {
            (held.as_secs_f64() / hold.as_secs_f64()).min(1.0)
        };
        let full = (share * 20.0).round() as usize;
        Some(format!(
            "[{}{}] {} of {}",
            "#".repeat(full),
            "-".repeat(20 - full),
            text(&rollout["held"]),
            text(&rollout["hold"])
        ))
    }

    /// The newest audit sequence number.
    async fn latest_event(api: &Api) -> u64 {
        match api.get("/v1/events?limit=1").await {
            Ok(page) => page["latest_seq"].as_u64().unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Appends the route's (or flag's) events after `cursor` (the last five
    /// kept); returns the new cursor.
    async fn subject_events(
        api: &Api,
        rolled: Rolled<'_>,
        cursor: u64,
        kept: &mut Vec<String>,
    ) -> u64 {
        let Ok(page) = api
            .get(&format!("/v1/events?after={cursor}&limit=1000"))
            .await
        else {
            return cursor;
        };
        let target = rolled.path();
        for e in page["events"].as_array().into_iter().flatten() {
            if e["target"] == target.as_str() {
                kept.push(format!(
                    "{} {} by {}",
                    text(&e["time"]),
                    text(&e["action"]),
                    text(&e["actor"])
                ));
            }
        }
        let excess = kept.len().saturating_sub(5);
        kept.drain(..excess);
        page["next_after"].as_u64().unwrap_or(cursor)
    }
}

// === HTTP ===

struct Api {
    base: String,
    token: Option<String>,
}

impl Api {
    async fn get(&self, path: &str) -> Result<Value, CtlError> {
        self.call(Method::GET, path, None, None).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<u64>,
    ) -> Result<Value, CtlError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(v) = if_match {
            req = req.header("if-match", format!("\"{v}\""));
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        // Every write says JSON, even without a body (the API refuses
        // writes that do not: a web page cannot send it without a CORS
        // preflight).
        req = req.header("content-type", "application/json");
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| CtlError::Usage(format!("bad admin URL {url}: {e}")))?;
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let resp = tokio::time::timeout(std::time::Duration::from_secs(30), client.request(req))
            .await
            .map_err(|_| CtlError::Failed(format!("{url}: no answer within 30 s")))?
            .map_err(|e| CtlError::Failed(unreachable(&url, &e)))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CtlError::Failed(format!("{url}: {e}")))?
            .to_bytes();
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let error = &value["error"];
        let message = error["message"]
            .as_str()
            .unwrap_or_else(|| status.canonical_reason().unwrap_or(""));
        // The body was ctl's, not the user's: where in it a value sat means
        // nothing to them.
        let message = match message.rfind(" at line ") {
            Some(at) if message[at..].contains(" column ") => &message[..at],
            _ => message,
        };
        let hint = match status {
            StatusCode::UNAUTHORIZED => {
                " (give a token: --token-file FILE, --token, or SWITCHYARD_TOKEN)"
            }
            _ => "",
        };
        Err(CtlError::Failed(format!(
            "{} {}: {message}{hint}",
            status.as_u16(),
            error["code"].as_str().unwrap_or("error"),
        )))
    }
}

/// Why the admin API at `url` could not be asked, with what to check.
fn unreachable(url: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let refused = cur
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
    if refused {
        format!("cannot reach the admin API at {url}: connection refused. Is Switchyard running, and is --admin (or SWITCHYARD_ADMIN) its admin listener's address?")
    } else {
        format!("cannot reach the admin API at {url}: {cur}")
    }
}

// === tables ===

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = String>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut out, &mut header.iter().map(|h| h.to_string()));
    for row in rows {
        line(&mut out, &mut row.iter().cloned());
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn status_table(state: &Value) -> String {
    let mut rows = Vec::new();
    for route in state["routes"].as_array().into_iter().flatten() {
        for b in route["backends"].as_array().into_iter().flatten() {
            // An endpoint out of service says so: `127.0.0.1:8082 (ejected)`.
            let health = &state["endpoint_health"][text(&route["name"])][text(&b["name"])];
            let endpoints: Vec<String> = b["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| match health[text(e)].as_str() {
                    Some(s) if s != "healthy" => format!("{} ({s})", text(e)),
                    _ => text(e),
                })
                .collect();
            // `*`: set over the configuration file.
            let mark = if state["overridden"]["routes"]
                .as_array()
                .is_some_and(|r| r.contains(&route["name"]))
            {
                "*"
            } else {
                ""
            };
            rows.push(vec![
                text(&route["name"]),
                text(&b["name"]),
                format!("{}%{mark}", text(&b["weight"])),
                endpoints.join(","),
            ]);
        }
    }
    let mut out = format!("state version {}\n\n", text(&state["version"]));
    out.push_str(&table(&["ROUTE", "BACKEND", "WEIGHT", "ENDPOINTS"], &rows));
    if let Some(flags) = state["flags"].as_array().filter(|f| !f.is_empty()) {
        out.push('\n');
        out.push_str(&flags_table(flags));
    }
    if !state["overridden"].is_null() {
        out.push('\n');
        let line = overridden_line(&state["overridden"]);
        if line.starts_with("set over") {
            out.push_str("* ");
        }
        out.push_str(&line);
    }
    out
}

fn weights_line(v: &Value, order: &[String]) -> String {
    format!(
        "route {}: {}\n",
        text(&v["route"]),
        weights_in(&v["weights"], order)
    )
}

/// `blue=90% canary=10%`: in `order` (the route's bucket order), any
/// backend it does not name after.
fn weights_in(weights: &Value, order: &[String]) -> String {
    let Some(weights) = weights.as_object() else {
        return String::new();
    };
    let mut names: Vec<&String> = order.iter().filter(|b| weights.contains_key(*b)).collect();
    names.extend(weights.keys().filter(|b| !order.contains(b)));
    names
        .iter()
        .map(|b| format!("{b}={}%", text(&weights[b.as_str()])))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The backends of `route` in bucket order (the configuration's), or none
/// when the state cannot be read (then names sort alphabetically).
async fn bucket_order(api: &Api, route: &str) -> Vec<String> {
    let Ok(state) = api.get("/v1/state").await else {
        return Vec::new();
    };
    state["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"] == route)
        .flat_map(|r| r["backends"].as_array().into_iter().flatten())
        .map(|b| text(&b["name"]))
        .collect()
}

fn flags_table(flags: &[Value]) -> String {
    let rows: Vec<Vec<String>> = flags
        .iter()
        .map(|f| {
            let groups: Vec<String> = f["target_groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            let overrides = f["overrides"].as_object().map_or(0, |o| o.len());
            vec![
                text(&f["name"]),
                text(&f["enabled"]),
                format!("{}%", text(&f["rollout_percentage"])),
                if groups.is_empty() {
                    "-".into()
                } else {
                    groups.join(",")
                },
                overrides.to_string(),
                // Last: a long one runs on rather than widening the rest.
                f["description"].as_str().unwrap_or("-").replace('\n', " "),
            ]
        })
        .collect();
    table(
        &[
            "FLAG",
            "ENABLED",
            "ROLLOUT",
            "GROUPS",
            "OVERRIDES",
            "DESCRIPTION",
        ],
        &rows,
    )
}

fn flag_stats_table(v: &Value) -> String {
    let ms = |x: &Value| x.as_f64().map_or("-".into(), |x| format!("{x:.1} ms"));
    let rows: Vec<Vec<String>> = ["on", "off"]
        .iter()
        .map(|c| {
            let s = &v["cohorts"][*c];
            vec![
                (*c).to_owned(),
                text(&s["requests"]),
                text(&s["errors"]),
                s["error_rate"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{x:.2} %")),
                ms(&s["p50_ms"]),
                ms(&s["p95_ms"]),
                ms(&s["p99_ms"]),
            ]
        })
        .collect();
    let mut out = format!(
        "flag {} over the last {} s\n",
        text(&v["flag"]),
        text(&v["window_seconds"])
    );
    out.push_str(&table(
        &[
            "COHORT",
            "REQUESTS",
            "ERRORS",
            "ERROR RATE",
            "P50",
            "P95",
            "P99",
        ],
        &rows,
    ));
    let d = &v["error_rate_difference"];
    let verdict = match (d["beyond_noise"].as_bool(), d["p_value"].as_f64()) {
        (Some(true), Some(p)) => format!(
            "error rates differ beyond noise: on {:+.2} points against off (two-proportion z = {:.2}, p = {p:.4})",
            d["points"].as_f64().unwrap_or(0.0),
            d["z"].as_f64().unwrap_or(0.0)
        ),
        (Some(false), Some(p)) => format!(
            "error rates within noise at this sample size (p = {p:.2}): not a regression, nor proof there is none"
        ),
        _ => "no comparison yet: a cohort has no requests".into(),
    };
    out.push_str(&format!("{verdict}\n"));
    out
}

fn stats_table(v: &Value) -> String {
    let ms = |x: &Value| x.as_f64().map_or("-".into(), |m| format!("{m:.1}"));
    let rows: Vec<Vec<String>> = v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            vec![
                text(&b["backend"]),
                text(&b["requests"]),
                text(&b["errors"]),
                format!("{:.2}%", b["error_rate_percent"].as_f64().unwrap_or(0.0)),
                ms(&b["p50_ms"]),
                ms(&b["p95_ms"]),
                ms(&b["p99_ms"]),
            ]
        })
        .collect();
    let scope = match v["scope"].as_str() {
        Some("fleet") => format!(", {} replica(s) merged", text(&v["replicas"])),
        _ => ", this replica only".to_owned(),
    };
    let mut out = format!(
        "route {} over the last {} s{scope}\n\n",
        text(&v["route"]),
        text(&v["window_seconds"])
    );
    out.push_str(&table(
        &[
            "BACKEND",
            "REQUESTS",
            "ERRORS",
            "ERROR RATE",
            "P50 MS",
            "P95 MS",
            "P99 MS",
        ],
        &rows,
    ));
    out
}

fn events_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                text(&e["seq"]),
                text(&e["time"]),
                match e["replica"].as_str() {
                    Some(replica) => format!("{}@{replica}", text(&e["actor"])),
                    None => text(&e["actor"]),
                },
                text(&e["action"]),
                text(&e["target"]),
                format!("{} -> {}", compact(&e["before"]), compact(&e["after"])),
            ]
        })
        .collect();
    table(
        &["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "CHANGE"],
        &rows,
    )
}

fn fleet_table(v: &Value) -> String {
    if v["mode"] != "fleet" {
        return format!(
            "standalone (no `fleet:` in the configuration): state in this replica's state_dir, version {}\n",
            text(&v["version"])
        );
    }
    let store = &v["store"];
    let mut out = format!(
        "replica {} serves version {} (etcd revision {})\nstore: etcd {} prefix {}: {}\n",
        text(&v["replica"]["id"]),
        text(&v["replica"]["version"]),
        text(&v["replica"]["revision"]),
        text(&store["endpoint"]),
        text(&store["prefix"]),
        if store["up"] == true {
            "up".to_owned()
        } else {
            format!("DOWN ({})", text(&store["error"]))
        }
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let rows: Vec<Vec<String>> = v["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let ago = m["seen_at_ms"].as_i64().map_or("-".into(), |t| {
                format!("{:.1}s ago", (now - t) as f64 / 1000.0)
            });
            let leads: Vec<String> = m["leads"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            vec![
                text(&m["id"]),
                text(&m["admin"]),
                text(&m["version"]),
                text(&m["revision"]),
                ago,
                if leads.is_empty() {
                    "-".into()
                } else {
                    leads.join(",")
                },
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &[
            "REPLICA",
            "ADMIN",
            "VERSION",
            "REVISION",
            "LAST SEEN",
            "LEADS",
        ],
        &rows,
    ));
    if let Some(leaders) = v["leaders"].as_object().filter(|l| !l.is_empty()) {
        out.push_str("\nrollout leaders:\n");
        for (route, replica) in leaders {
            out.push_str(&format!("  {route}: {}\n", text(replica)));
        }
    }
    out
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(59).collect::<String>())
    } else {
        s
    }
}
