//! Client commands: talk to a host over its HTTP API.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

/// Where the host is.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// URL of any host of the region.
    #[arg(
        long,
        env = "MERIDIAN_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Print JSON instead of text meant for people.
    #[arg(long, global = true)]
    pub json: bool,
    /// Bearer token, when the host requires one.
    #[arg(long, env = "MERIDIAN_TOKEN", global = true, hide_env_values = true, value_parser = BearerToken)]
    pub token: Option<String>,
}

impl Target {
    /// The URL of an API path under `--url`, each segment percent-encoded: an id with
    /// `#` or `?` in it names that aggregate, rather than ending the path early and
    /// sending the command to another one.
    pub(super) fn endpoint(&self, segments: &[&str]) -> anyhow::Result<reqwest::Url> {
        if let Some(dots) = segments.iter().find(|s| **s == "." || **s == "..") {
            bail!(
                "`{dots}` cannot stand in a URL path; no aggregate or group can have it as its name"
            );
        }
        let mut url = reqwest::Url::parse(&self.url)
            .with_context(|| format!("--url `{}` is not a URL", self.url))?;
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("--url `{}` cannot take a path", self.url))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }
}

/// A token is sent in a header: one with a line break or other control character (a
/// file read with its trailing newline) cannot be, and was left out without a word.
/// Refused without showing it, as a plain function parser's error would (clap quotes
/// the value it refused): the message lands in terminals and CI logs.
#[derive(Clone)]
struct BearerToken;

impl clap::builder::TypedValueParser for BearerToken {
    type Value = String;

    fn parse_ref(
        &self,
        _command: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let refuse = || {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                "the token (--token or MERIDIAN_TOKEN) is visible ASCII only; check for a \
                 trailing newline or carriage return\n",
            )
        };
        let token = value.to_str().ok_or_else(refuse)?;
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| refuse())?;
        Ok(token.to_string())
    }
}

/// `meridian plugin ...`
#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Upload a component for an aggregate type.
    Upload {
        /// Aggregate type, e.g. `bank-account`.
        aggregate_type: String,
        /// The component, e.g. `target/wasm32-wasip2/release/bank_account.wasm`.
        file: PathBuf,
        /// Accept it without first replaying stored aggregates of the type through it.
        #[arg(long)]
        force: bool,
        /// Check it (validation, stored histories) and store nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List the newest plugin of every aggregate type.
    List {
        #[command(flatten)]
        target: Target,
    },
}

/// `meridian command <type> <id> <json>`
#[derive(Debug, clap::Args)]
pub struct CommandArgs {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The command as JSON, e.g. `{"type":"Deposit","amount":10}`.
    pub command: String,
    /// Idempotency key (a UUID); sending it again returns the first result. Without
    /// it the CLI makes one up, so its own retries (below) never run the command twice.
    #[arg(long)]
    pub command_id: Option<uuid::Uuid>,
    /// How many times to send the command again after a 503 (a host overloaded or
    /// draining, a partition moving), waiting as `Retry-After` says, or a 502 or 504
    /// (a proxy in front that lost the host's answer).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Refuse unless the aggregate is at this version.
    #[arg(long)]
    pub expected_version: Option<i64>,
    #[command(flatten)]
    pub target: Target,
}

/// `meridian events`
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EventsArgs {
    /// `tail`: follow new events live.
    #[command(subcommand)]
    pub command: Option<EventsCommand>,
    /// Start after this position (0: from the beginning).
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// Events per page.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// Only this aggregate type.
    #[arg(long = "type")]
    pub aggregate_type: Option<String>,
    /// Only this aggregate id.
    #[arg(long = "id")]
    pub aggregate_id: Option<String>,
    /// Keep reading pages until there are no more.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub target: Target,
}

/// `meridian events tail`
#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// Print events as they commit (after catching up from --after), until Ctrl-C.
    ///
    /// With `--group g --member i --members n`, print member i's share of the
    /// aggregates, starting after the member's acknowledged position, and acknowledge
    /// what has been printed as it goes (at most every half second), so a restarted
    /// tail resumes there.
    Tail {
        /// Start after this position (default: from the beginning, or for a group member
        /// from its acknowledged position).
        #[arg(long)]
        after: Option<i64>,
        /// Only this aggregate type.
        #[arg(long = "type")]
        aggregate_type: Option<String>,
        /// Only this aggregate id.
        #[arg(long = "id")]
        aggregate_id: Option<String>,
        /// Consumer group to read as.
        #[arg(long, requires_all = ["member", "members"])]
        group: Option<String>,
        /// This member of the group, from 0.
        #[arg(long, requires = "group")]
        member: Option<u32>,
        /// How many members the group has.
        #[arg(long, requires = "group")]
        members: Option<u32>,
        #[command(flatten)]
        target: Target,
    },
}

/// A consumer group member the tail reads and acknowledges as.
#[derive(Debug, Clone)]
struct GroupSlot {
    group: String,
    member: u32,
    members: u32,
}

pub(super) fn client(target: &Target) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &target.token
        && let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
    {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("meridian-cli/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client builds")
}

/// Sends a request and returns its JSON, turning API errors into readable messages.
pub(super) async fn send(
    request: reqwest::RequestBuilder,
    url: &str,
) -> anyhow::Result<(u16, Value)> {
    let response = request.send().await.with_context(|| {
        format!("cannot reach a Meridian host at {url}; is it running? (set --url or MERIDIAN_URL)")
    })?;
    read(response, url).await
}

/// The status and JSON body of an answer; a 4xx or 5xx becomes the error it names.
async fn read(response: reqwest::Response, url: &str) -> anyhow::Result<(u16, Value)> {
    let status = response.status().as_u16();
    let body: Value = response.json().await.with_context(|| {
        format!("the host at {url} answered {status} with a body that is not JSON")
    })?;
    if status >= 400 {
        let code = body["error"]["code"].as_str().unwrap_or("error");
        let message = body["error"]["message"].as_str().unwrap_or("(no message)");
        if status == 401 {
            bail!(
                "{status} {code}: {message} — pass --token or set MERIDIAN_TOKEN (`meridian dev` \
                 prints a new token each time it starts)"
            );
        }
        bail!("{status} {code}: {message}");
    }
    Ok((status, body))
}

pub(super) fn print_json(value: &Value) {
    out!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Runs `meridian plugin ...`.
pub async fn plugin(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Upload {
            aggregate_type,
            file,
            force,
            dry_run,
            target,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let size = bytes.len();
            if !target.json {
                eprintln!(
                    "uploading {} ({} bytes) as `{aggregate_type}`...",
                    file.display(),
                    size
                );
            }
            let url = target.endpoint(&["v1", "plugins", &aggregate_type])?;
            let (status, body) = send(
                client(&target)
                    .put(url)
                    .query(&[("force", force), ("dry_run", dry_run)])
                    .header("content-type", "application/wasm")
                    .body(bytes),
                &target.url,
            )
            .await?;
            if target.json {
                print_json(&body);
            } else {
                let verb = if body["dry_run"] == true {
                    "checked, nothing stored; it would be"
                } else if status == 201 {
                    "stored as"
                } else {
                    "unchanged, already"
                };
                out!(
                    "{aggregate_type}: {verb} version {}\n  size    {} bytes\n  sha256  {}",
                    body["version"],
                    body["size_bytes"],
                    body["sha256"].as_str().unwrap_or("")
                );
                let rollout = &body["rollout"];
                if rollout.is_object() {
                    let pending: Vec<&str> = rollout["hosts_pending"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
                        .unwrap_or_default();
                    if pending.is_empty() {
                        out!(
                            "  runs on every host of the region ({})",
                            rollout["hosts_running"]
                        );
                    } else {
                        out!(
                            "  runs on {} hosts; not yet on {} (they run the previous version until they have compiled it)",
                            rollout["hosts_running"],
                            pending.join(", ")
                        );
                    }
                }
                let checked = &body["history_checked"];
                if checked.is_object() {
                    out!(
                        "  replays {} stored aggregates ({} events{})",
                        checked["aggregates"],
                        checked["events"],
                        if checked["complete"] == false {
                            ", stopped at the event budget"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        PluginCommand::List { target } => {
            let url = target.endpoint(&["v1", "plugins"])?;
            let (_, body) = send(client(&target).get(url), &target.url).await?;
            if target.json {
                print_json(&body);
            } else {
                let plugins = body["plugins"].as_array().cloned().unwrap_or_default();
                if plugins.is_empty() {
                    out!(
                        "no plugins uploaded yet; try `meridian plugin upload <type> <file.wasm>`"
                    );
                }
                out!(
                    "{:<24} {:>7} {:>10}  {:<16} uploaded",
                    "TYPE",
                    "VERSION",
                    "SIZE",
                    "SHA256"
                );
                for p in plugins {
                    out!(
                        "{:<24} {:>7} {:>10}  {:<16} {}",
                        p["aggregate_type"].as_str().unwrap_or(""),
                        p["version"],
                        p["size_bytes"],
                        &p["sha256"].as_str().unwrap_or("")
                            [..16.min(p["sha256"].as_str().unwrap_or("").len())],
                        p["uploaded_at"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

/// Answers a command is sent again after, under the same id: the host's 503 (busy,
/// draining, a partition moving) and a proxy's 502 and 504 (the host's answer lost on
/// its way back). A 502 in the API's own JSON is the host's, and final: an answer too
/// large to come back from the home region is as large the next time.
fn worth_retrying(response: &reqwest::Response) -> bool {
    match response.status().as_u16() {
        503 => true,
        502 | 504 => !content_type(response).starts_with("application/json"),
        _ => false,
    }
}

/// The answer's content type ("" without one): tells the API's own answers (JSON, an
/// event stream) from a proxy's.
fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

/// Runs `meridian command ...`.
pub async fn command(args: CommandArgs) -> anyhow::Result<()> {
    let command: Value = serde_json::from_str(&args.command)
        .with_context(|| format!("the command is not valid JSON: {}", args.command))?;
    let command_id = args.command_id.unwrap_or_else(uuid::Uuid::now_v7);
    let mut body = serde_json::json!({ "command": command, "command_id": command_id });
    if let Some(v) = args.expected_version {
        body["expected_version"] = v.into();
    }
    let url =
        args.target
            .endpoint(&["v1", "aggregates", &args.aggregate_type, &args.aggregate_id])?;
    let client = client(&args.target);
    // Safe to send again: the command id makes a second run return the first result.
    let again = format!("send it again with --command-id {command_id}: it never applies twice");
    let mut attempt = 0;
    let response = loop {
        let (code, wait) = match client.post(url.clone()).json(&body).send().await {
            Ok(response) if !worth_retrying(&response) || attempt >= args.retries => {
                break response;
            }
            Ok(response) => {
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(1)
                    .clamp(1, 30);
                let status = response.status();
                let code = response
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|b| b["error"]["code"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_lowercase());
                (format!("{} {code}", status.as_u16()), wait)
            }
            // Never sent, and nothing sent before: nothing ran, and no host is there.
            Err(error) if error.is_connect() && attempt == 0 => {
                return Err(error).with_context(|| {
                    format!(
                        "cannot reach a Meridian host at {}; is it running? (set --url or MERIDIAN_URL)",
                        args.target.url
                    )
                });
            }
            // The answer lost (or the host gone since an earlier attempt was sent): the
            // command may have run.
            Err(error) if attempt >= args.retries => {
                return Err(error).with_context(|| {
                    format!(
                        "no answer from {}; the command may have run: {again}",
                        args.target.url
                    )
                });
            }
            Err(error) => (format!("no answer ({error})"), 1),
        };
        attempt += 1;
        eprintln!(
            "{code}; sending the command again in {wait} s (attempt {} of {})",
            attempt + 1,
            args.retries + 1
        );
        tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
    };
    // Set when the host forwarded the command to the aggregate's home region.
    let ran_in = response
        .headers()
        .get(crate::region::SERVED_BY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Any server error may come after the command ran (a proxy's 502 or 504 for an
    // answer lost on its way back, a 500), and so may an answer that is not the API's
    // (a proxy's page): the error names the id to send it again with, or a second run
    // with a new id could apply it twice.
    let may_have_run = response.status().is_server_error()
        || !content_type(&response).starts_with("application/json");
    let (_, result) = read(response, &args.target.url).await.map_err(|error| {
        if may_have_run {
            error.context(again)
        } else {
            error
        }
    })?;
    if args.target.json {
        print_json(&result);
    } else {
        out!(
            "{}/{} is now at version {}{}{}",
            args.aggregate_type,
            args.aggregate_id,
            result["version"],
            if result["duplicate"] == Value::Bool(true) {
                " (repeated command id: first result)"
            } else {
                ""
            },
            match &ran_in {
                Some(region) => format!(" (run in its home region, {region})"),
                None => String::new(),
            }
        );
        for event in result["events"].as_array().into_iter().flatten() {
            out!(
                "  v{:<6} {} {}",
                event["version"],
                event["type"].as_str().unwrap_or(""),
                event["payload"]
            );
        }
    }
    Ok(())
}

fn print_event(e: &Value, json: bool) {
    if json {
        out!("{e}");
    } else {
        out!(
            "{:>8}  {}/{} v{}  {} {}",
            e["position"],
            e["aggregate_type"].as_str().unwrap_or(""),
            e["aggregate_id"].as_str().unwrap_or(""),
            e["version"],
            e["type"].as_str().unwrap_or(""),
            e["payload"]
        );
    }
}

/// Stores a group member's position after what it has printed.
async fn ack(target: &Target, slot: &GroupSlot, position: i64) -> anyhow::Result<()> {
    let member = slot.member.to_string();
    let url = target.endpoint(&["v1", "groups", &slot.group, "members", &member, "ack"])?;
    let body = serde_json::json!({ "position": position, "members": slot.members });
    send(client(target).post(url).json(&body), &target.url).await?;
    Ok(())
}

/// Follows the SSE stream of `GET /v1/events`, reconnecting from the last position
/// seen if the connection drops. As a group member, acknowledges what it printed.
async fn tail(
    after: Option<i64>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    group: Option<GroupSlot>,
    target: Target,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    const ACK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
    let mut last = after;
    // The id of the event at `last`, once one was received: sent along on a reconnect,
    // so that a host of another region (or a restored store) refuses the position
    // rather than resume after another event there.
    let mut last_event_id: Option<String> = None;
    // The starting point is the member's to give, not one it processed: acknowledging
    // it (0 when reading from the start) was refused every half second.
    let mut acked = after;
    let mut connected = false;
    loop {
        let mut query = Vec::new();
        if let Some(last) = last {
            query.push(("after", last.to_string()));
        }
        if let (Some(event_id), None) = (&last_event_id, &group) {
            query.push(("after_event_id", event_id.clone()));
        }
        if let Some(slot) = &group {
            query.push(("group", slot.group.clone()));
            query.push(("member", slot.member.to_string()));
            query.push(("members", slot.members.to_string()));
        }
        if let Some(t) = &aggregate_type {
            query.push(("aggregate_type", t.clone()));
        }
        if let Some(id) = &aggregate_id {
            query.push(("aggregate_id", id.clone()));
        }
        let url = target.endpoint(&["v1", "events"])?;
        let sent = client(&target)
            .get(url)
            .query(&query)
            .header("accept", "text/event-stream")
            .send()
            .await;
        // A host answering 503 (starting, draining) is waited for, and so is a proxy's
        // 502 or 504 (its host restarting behind it); so is a host that went away after
        // the stream ran (restarted): the tail resumes where it was.
        let response = match sent {
            Ok(response) if response.status().is_success() => {
                // A proxy that dropped `Accept` gets a page of JSON back, which holds no
                // stream message: reading it as one would reconnect forever, silently.
                let content_type = content_type(&response);
                if !content_type.starts_with("text/event-stream") {
                    bail!(
                        "{} answered {} without an event stream (content-type {content_type:?}); \
                         is a proxy in between dropping the `Accept: text/event-stream` header?",
                        target.url,
                        response.status().as_u16(),
                    );
                }
                response
            }
            Ok(response) => {
                let status = response.status();
                let retry = worth_retrying(&response);
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let code = body["error"]["code"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_lowercase());
                if !retry {
                    bail!(
                        "{} {code}: {}",
                        status.as_u16(),
                        body["error"]["message"].as_str().unwrap_or("(no message)")
                    );
                }
                eprintln!("{} {code}; trying again in 1 s", status.as_u16());
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(error) if connected => {
                eprintln!("cannot reach {}: {error}; trying again in 1 s", target.url);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "cannot reach a Meridian host at {}; is it running? (set --url or MERIDIAN_URL)",
                        target.url
                    )
                });
            }
        };
        connected = true;
        let mut body = response.bytes_stream();
        // Bytes, not text: a chunk may end inside a multi-byte character, which
        // decoding chunk by chunk would replace with U+FFFD.
        let mut buffer: Vec<u8> = Vec::new();
        // How far `buffer` is known to hold no message end: a large event arrives in
        // many chunks, and scanning it from the start for each one was quadratic.
        let mut scanned = 0;
        let mut ticks = tokio::time::interval(ACK_EVERY);
        loop {
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                _ = ticks.tick() => {
                    if let (Some(slot), Some(position)) = (&group, last)
                        && acked != last
                    {
                        match ack(&target, slot, position).await {
                            Ok(()) => acked = last,
                            Err(error) => eprintln!("could not acknowledge position {position}: {error:#}"),
                        }
                    }
                    continue;
                }
            };
            let Some(Ok(chunk)) = chunk else { break };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer[scanned..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|at| scanned + at)
            {
                let message: Vec<u8> = buffer.drain(..end + 2).collect();
                scanned = 0;
                let message = String::from_utf8_lossy(&message);
                let data: String = message
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue; // keep-alive
                }
                if let Ok(event) = serde_json::from_str::<Value>(&data) {
                    print_event(&event, target.json);
                    if let Some(position) = event["position"].as_i64() {
                        last = Some(position);
                        last_event_id = event["event_id"].as_str().map(str::to_string);
                    }
                }
            }
            // The last byte may be the first half of a message end.
            scanned = buffer.len().saturating_sub(1);
        }
        if !target.json {
            match last {
                Some(last) => eprintln!("connection lost; resuming after position {last}"),
                None => eprintln!("connection lost; reconnecting"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Runs `meridian events`.
pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    if let Some(EventsCommand::Tail {
        after,
        aggregate_type,
        aggregate_id,
        group,
        member,
        members,
        target,
    }) = args.command
    {
        let group = match (group, member, members) {
            (Some(group), Some(member), Some(members)) => Some(GroupSlot {
                group,
                member,
                members,
            }),
            _ => None,
        };
        return tail(after, aggregate_type, aggregate_id, group, target).await;
    }
    let mut after = args.after;
    loop {
        let mut query = vec![
            ("after", after.to_string()),
            ("limit", args.limit.to_string()),
        ];
        if let Some(t) = &args.aggregate_type {
            query.push(("aggregate_type", t.clone()));
        }
        if let Some(id) = &args.aggregate_id {
            query.push(("aggregate_id", id.clone()));
        }
        let url = args.target.endpoint(&["v1", "events"])?;
        let (_, page) = send(
            client(&args.target).get(url).query(&query),
            &args.target.url,
        )
        .await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for event in &events {
            print_event(event, args.target.json);
        }
        after = page["next"].as_i64().unwrap_or(after);
        if !args.all || events.is_empty() {
            if !args.target.json && !events.is_empty() {
                eprintln!("next page: --after {after}");
            }
            return Ok(());
        }
    }
}

/// `meridian cluster ...`
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Members, their states and the partition → owner map.
    Status {
        #[command(flatten)]
        target: Target,
    },
}

/// Runs `meridian cluster ...`.
pub async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Status { target } = command;
    let url = target.endpoint(&["v1", "cluster"])?;
    let (_, status) = send(client(&target).get(url), &target.url).await?;
    if target.json {
        print_json(&status);
        return Ok(());
    }
    let members = status["members"].as_array().cloned().unwrap_or_default();
    out!(
        "partitions {}   membership epoch {}   answered by {}",
        status["partitions"],
        status["membership_epoch"],
        status["node_id"].as_str().unwrap_or("?")
    );
    let load = &status["load"];
    out!(
        "that host: {} of {} commands in flight, {} event streams open",
        load["commands_in_flight"],
        load["max_commands_in_flight"],
        load["event_streams_open"]
    );
    out!();
    out!(
        "   {:<24} {:<9} {:<6} {:>10}  {:<32} last heartbeat",
        "MEMBER",
        "STATE",
        "ALIVE",
        "PARTITIONS",
        "ADDRESS"
    );
    // One letter per member, used in the partition map below.
    let letters: Vec<char> = ('A'..='Z').collect();
    let mut letter_of = std::collections::HashMap::new();
    for (i, m) in members.iter().enumerate() {
        let id = m["id"].as_str().unwrap_or("");
        let letter = letters.get(i).copied().unwrap_or('*');
        letter_of.insert(id.to_string(), letter);
        out!(
            "{letter}  {:<24} {:<9} {:<6} {:>10}  {:<32} {}",
            id,
            m["state"].as_str().unwrap_or(""),
            if m["alive"] == Value::Bool(true) {
                "yes"
            } else {
                "NO"
            },
            m["partitions_owned"],
            m["address"].as_str().unwrap_or(""),
            m["last_heartbeat"].as_str().unwrap_or("")
        );
    }
    out!();
    out!("partition map (one character per partition, `.` = moving):");
    let owners = status["partition_owners"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (row, chunk) in owners.chunks(64).enumerate() {
        let line: String = chunk
            .iter()
            .map(|o| {
                o.as_str()
                    .and_then(|id| letter_of.get(id).copied())
                    .unwrap_or('.')
            })
            .collect();
        out!("  {:>4}  {line}", row * 64);
    }
    if let Some(regions) = status["regions"].as_array().filter(|r| !r.is_empty()) {
        out!();
        out!(
            "region {}, receiving from:",
            status["region"].as_str().unwrap_or("?")
        );
        out!(
            "   {:<16} {:>10} {:>10} {:>12}  last event",
            "REGION",
            "LAG (ms)",
            "PENDING",
            "RECEIVED"
        );
        for r in regions {
            out!(
                "   {:<16} {:>10} {:>10} {:>12}  {}",
                r["region"].as_str().unwrap_or("?"),
                r["lag_ms"],
                r["pending"],
                r["events_received"],
                r["last_event_at"].as_str().unwrap_or("-")
            );
        }
    } else if let Some(error) = status["regions_error"].as_str() {
        out!();
        out!(
            "region {}: {error}",
            status["region"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
