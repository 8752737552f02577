//! `tidepool node list|remove`, `tidepool cluster token`, the `up` banner's cluster lines, and
//! the node's side of them: `GET /cluster`, `POST /admin/node/remove`, and the answer of
//! leader-only routes on a follower (409 with the leader's http address; the CLI of
//! `node remove` follows it, the others print it).

use std::path::Path;
use std::sync::Arc;

use clap::Subcommand;
use tidepool_cluster::Command;
use tidepool_fs::Fs;

use crate::cluster::{Cluster, ClusterToken};
use crate::datadir::anyhow_free::Result;
use crate::http;
use crate::nodekey::NodeKey;
use crate::settings::human_bytes;

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Every node of the cluster: id, addresses, role, voter, reachable, device capacity/used.
    List {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take node ID out of the cluster (on the leader: dirty blocks go to the bucket first).
    Remove { id: u64 },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Print this cluster's token (from `<data_dir>/cluster.token`) and the command to add a node.
    Token,
}

/// Routes that must run on the leader (the tiering engine's uploads, GC and manifests run
/// there only, and membership changes are made there).
pub fn leader_only(path: &str) -> bool {
    matches!(path, "/admin/spin-down" | "/admin/snapshot" | "/admin/tier/flush" | "/admin/node/remove")
}

/// A follower's answer to a leader-only route: 409, the leader's id and http address.
pub fn not_leader(cluster: &Cluster, fs: &Fs, path: &str) -> Option<(u16, String)> {
    if fs.meta().is_leader() {
        return None;
    }
    let (leader, http) = cluster.leader_http(fs);
    let error = match (&http, leader) {
        (_, 0) => format!("{path} runs on the leader and there is none right now; retry in a few seconds"),
        (Some(h), l) => format!(
            "{path} runs on the leader: node {l} at {h} (this is node {}); run the command there \
             (TIDEPOOL_HTTP_LISTEN={})",
            cluster.node_id,
            h.trim_start_matches("http://")
        ),
        (None, l) => format!("{path} runs on the leader, node {l}, whose http address is not known yet; retry"),
    };
    Some((409, serde_json::json!({ "error": error, "leader_id": leader, "leader_http": http }).to_string()))
}

/// `POST /admin/node/remove {"id": N}` on the leader.
pub async fn remove_route(cluster: &Cluster, fs: &Fs, tier: &tidepool_tiering::Tier, body: &[u8]) -> (u16, String) {
    let fail = |code: u16, msg: String| (code, serde_json::json!({ "error": msg }).to_string());
    let Some(id) = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v["id"].as_u64()) else {
        return fail(400, "body must be {\"id\": <node id>}".into());
    };
    let meta = fs.meta();
    let st = meta.status();
    let known = meta.read(|s| s.nodes.contains_key(&id)) || st.voters.contains(&id);
    if !known {
        return fail(404, format!("no node {id} in this cluster (`tidepool node list`)"));
    }
    if id == st.node_id {
        return fail(
            409,
            format!(
                "node {id} is the leader: stop it (`kill` / systemctl stop), wait for a new leader among the others, \
                 then remove it from there"
            ),
        );
    }
    if st.voters.iter().all(|v| *v == id) {
        return fail(409, format!("node {id} is the last node of the cluster; it cannot be removed"));
    }
    // Every dirty block goes to the bucket first: whatever copies the leaving node held, the
    // bucket has the bytes afterwards (clean blocks are read from it).
    let flushed = match tier.flush_all().await {
        Ok(r) => r,
        Err(e) => {
            return fail(
                503,
                format!("cannot upload the dirty blocks before removing node {id}: {e}; nothing changed"),
            );
        }
    };
    if let Err(e) = meta.propose(Command::DropNode { id }).await {
        return fail(503, format!("cannot record the removal of node {id}: {e}"));
    }
    if st.voters.contains(&id)
        && let Err(e) = meta.remove_node(id).await
    {
        return fail(
            503,
            format!("node {id} is dropped from the node table but not from the voters: {e}; run it again"),
        );
    }
    cluster.transport.remove_peer(id);
    tracing::info!(node_id = id, flushed_bytes = flushed.bytes, "node removed from the cluster");
    (
        200,
        serde_json::json!({ "removed": id, "uploaded_objects": flushed.objects, "uploaded_bytes": flushed.bytes })
            .to_string(),
    )
}

/// The `up` banner's cluster lines.
pub fn print_banner(cluster: &Arc<Cluster>, fs: &Fs, data_dir: &Path, replicas: usize) {
    let st = fs.meta().status();
    let role =
        if st.leader_id == st.node_id { "leader".to_string() } else { format!("leader is node {}", st.leader_id) };
    println!(
        "  cluster       node {} of {} ({} voters; {role}), transport {}",
        cluster.node_id,
        cluster.token.cluster_id,
        st.voters.len(),
        cluster.advertise
    );
    let members = fs.meta().read(|m| st.voters.iter().filter(|v| m.nodes.contains_key(v)).count()).max(1);
    let copies = replicas.min(members);
    println!(
        "  replicas      {copies} cop{} of each dirty block before a write is acknowledged{}",
        if copies == 1 { "y" } else { "ies" },
        if replicas > members {
            format!(" (replicas={replicas}, but {members} node(s) hold blocks)")
        } else {
            String::new()
        }
    );
    println!("  cluster token {} (0600; `tidepool cluster token` prints it)", ClusterToken::path(data_dir).display());
    println!(
        "  add a node    tidepool up --join {} --token \"$(cat {})\"  (with its own data folder and addresses)",
        cluster.advertise,
        ClusterToken::path(data_dir).display()
    );
}

pub fn run_cluster(cmd: ClusterCmd, data_dir: &Path) -> Result<()> {
    match cmd {
        ClusterCmd::Token => {
            let token = ClusterToken::read(data_dir)?.ok_or_else(|| {
                format!(
                    "no {} in {}: it is written at the first start of a node (`tidepool up`)",
                    crate::cluster::TOKEN_FILE,
                    data_dir.display()
                )
            })?;
            println!("{token}");
            eprintln!("add a node: tidepool up --join <this node's cluster address> --token {token}");
            Ok(())
        }
    }
}

pub fn run_node(cmd: NodeCmd, data_dir: &Path, addr: &str) -> Result<()> {
    match cmd {
        NodeCmd::List { json } => {
            let body = http::get(addr, "/cluster").map_err(|e| format!("no tidepool node answers at {addr}: {e}"))?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            if json {
                println!("{v:#}");
            } else {
                print_nodes(&v);
            }
            Ok(())
        }
        NodeCmd::Remove { id } => {
            let token = NodeKey::read(data_dir)
                .map_err(|e| format!("{e}; this command needs read access to the node's data folder (--data-dir)"))?
                .admin_token();
            let body = serde_json::json!({ "id": id }).to_string();
            let mut at = addr.to_string();
            for _ in 0..2 {
                let (code, answer) =
                    http::request_with_timeout(&at, "POST", "/admin/node/remove", Some(&token), &body, 3600)
                        .map_err(|e| format!("cannot reach the node at {at}: {e} (is `tidepool up` running?)"))?;
                let v: serde_json::Value =
                    serde_json::from_str(&answer).unwrap_or(serde_json::json!({ "error": answer }));
                if code == 409
                    && let Some(leader) = v["leader_http"].as_str()
                {
                    let leader = leader.trim_start_matches("http://").to_string();
                    eprintln!("(node {} is the leader: asking it at {leader})", v["leader_id"]);
                    at = leader;
                    continue;
                }
                if code != 200 {
                    return Err(v["error"].as_str().unwrap_or(&answer).to_string().into());
                }
                println!(
                    "removed node {id} (uploaded {} in {} objects first); stop its process now",
                    human_bytes(v["uploaded_bytes"].as_u64().unwrap_or(0)),
                    v["uploaded_objects"]
                );
                return Ok(());
            }
            Err("the leader changed while asking; run it again".into())
        }
    }
}

pub fn print_nodes(v: &serde_json::Value) {
    println!("cluster {}  leader {}  term {}", v["cluster_id"].as_str().unwrap_or("?"), v["leader_id"], v["term"]);
    println!(
        "{:<20} {:<8} {:<6} {:<9} {:<22} {:<28} {:<28} {:>10} {:>10}",
        "ID", "ROLE", "VOTER", "REACHABLE", "CLUSTER", "S3", "HTTP", "NVME USED", "CAPACITY"
    );
    for n in v["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let role = if n["leader"].as_bool() == Some(true) { "leader" } else { "follower" };
        let b = |k: &str| n["stats"][k].as_u64().map(human_bytes).unwrap_or_else(|| "?".into());
        let id = format!("{}{}", n["id"], if n["self"].as_bool() == Some(true) { " (this)" } else { "" });
        println!(
            "{:<20} {:<8} {:<6} {:<9} {:<22} {:<28} {:<28} {:>10} {:>10}",
            id,
            role,
            if n["voter"].as_bool() == Some(true) { "yes" } else { "no" },
            if n["reachable"].as_bool() == Some(true) { "yes" } else { "no" },
            n["addr"].as_str().unwrap_or(""),
            n["s3"].as_str().unwrap_or(""),
            n["http"].as_str().unwrap_or(""),
            b("used_bytes"),
            b("capacity_bytes"),
        );
    }
}
