//! `serval table`: show or edit a router's service table through its admin address.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serval_admin::{AdminError, Client, DelayVerdict, RuleEdit, render_table};

/// Flags of `serval table`.
#[derive(Debug, Args)]
pub struct TableArgs {
    /// The router's admin address (its `--admin`).
    #[arg(long, value_name = "ADDR", env = "SERVAL_ADMIN")]
    admin: SocketAddr,
    #[command(subcommand)]
    edit: Option<TableEdit>,
}

/// `serval table add|del`.
#[derive(Debug, Subcommand)]
enum TableEdit {
    /// Add a static rule: `forward ADDR`, `delay` or `drop`.
    Add(RuleArgs),
    /// Remove a static rule.
    Del(RuleArgs),
    /// List the SYNs held by DELAY rules (one per line: id, serviceID, client, age, time left).
    Delayed,
    /// Answer a held SYN: `resolve` (look its name up again now) or `drop` (NACK the client).
    Release {
        /// The held SYN's id, as `delayed` lists it.
        id: u64,
        /// `resolve` or `drop`.
        verdict: String,
    },
}

#[derive(Debug, Args)]
struct RuleArgs {
    /// The prefix: a name, `NAME/*`, a hex ID, `HEX/LEN` or `*`.
    prefix: String,
    /// `forward`, `delay` or `drop`.
    action: String,
    /// The next hop of a `forward` rule (IP:PORT).
    locator: Option<String>,
    /// Share of new flows among targets of the same priority.
    #[arg(long, default_value_t = 1)]
    weight: u32,
    /// Only the highest priority present receives flows.
    #[arg(long, default_value_t = 0)]
    priority: u32,
}

impl RuleArgs {
    fn edit(&self) -> RuleEdit {
        RuleEdit {
            prefix: self.prefix.clone(),
            action: self.action.clone(),
            locator: self.locator.clone(),
            weight: Some(self.weight),
            priority: Some(self.priority),
        }
    }
}

/// Runs `serval table`: a bad rule is a usage error (exit 2), an unreachable or failing admin
/// API a failure (exit 1).
pub fn run(args: TableArgs) -> ExitCode {
    let client = Client::new(args.admin);
    let result = match &args.edit {
        None => client.table().map(|view| print!("{}", render_table(&view))),
        Some(TableEdit::Add(rule)) => check(rule).and_then(|e| client.add_rule(&e)),
        Some(TableEdit::Del(rule)) => check(rule).and_then(|e| match client.remove_rule(&e) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AdminError::Http {
                addr: args.admin.to_string(),
                msg: format!("no such rule: {} {}", rule.prefix, rule.action),
            }),
            Err(e) => Err(e),
        }),
        Some(TableEdit::Delayed) => client.delayed().map(|list| {
            if list.is_empty() {
                println!("(no held SYNs)");
            }
            for d in list {
                println!(
                    "{}  {}  from {}  held {:.1}s  expires in {:.1}s",
                    d.id,
                    d.service,
                    d.client,
                    d.held_ms as f64 / 1000.0,
                    d.expires_in_ms as f64 / 1000.0
                );
            }
        }),
        Some(TableEdit::Release { id, verdict }) => verdict
            .parse::<DelayVerdict>()
            .and_then(|v| client.release(*id, v)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ AdminError::BadRequest(_)) => {
            note!("error: {e}");
            ExitCode::from(crate::EXIT_USAGE)
        }
        Err(e) => {
            note!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checks a rule locally, so a typo is a usage error before anything is sent.
fn check(rule: &RuleArgs) -> Result<RuleEdit, AdminError> {
    let edit = rule.edit();
    edit.parse()?;
    Ok(edit)
}
