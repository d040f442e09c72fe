//! The Wireshark dissector `contrib/wireshark/serval.lua`, run by tshark:
//!
//! * on the project's own traffic, captured on loopback with dumpcap while a router, an echo
//!   instance and clients make a registration, a connect by name, a migration, an
//!   unregistration and a NACK: every decoded field must equal what was sent (serviceIDs,
//!   flowIDs, flags, verno/ackno, nonces, SOURCE locators, registration fields, stream bytes
//!   and offsets, ACK ranges);
//! * on a seeded corpus of valid and mutated packets written to a pcap file: the dissector must
//!   call a packet malformed exactly when `serval-wire` refuses it, name the same error, and
//!   decode the valid ones to the values `serval-wire` reads; its UDP heuristic must claim
//!   exactly the packets whose header validates.
//!
//! Without tshark (or dumpcap) the tests skip with one line on stderr, except under `CI=true`,
//! where they fail. Every wait is bounded; every process is killed when the test ends.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serval_wire::{
    ControlFlags, ControlRepr, FlowId, Nonce, Protocol, RegistrationRepr, RejectReason, SalPacket,
    SalRepr, ServiceId, ServicePrefix, ServiceRepr,
};
use support::{Guard, lines, serval, spawn_ready, wait_line};

/// The dissector under test.
const DISSECTOR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../contrib/wireshark/serval.lua"
);

/// Whether `tools` all run. If not: under `CI=true` the test fails; otherwise it is skipped
/// with one line written straight to stderr (the harness does not capture it).
fn tools_present(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new(t)
                .arg("-v")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not found (apt-get install tshark)",
        missing.join(" and ")
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("wireshark::{test}: {why}; CI=true, so this fails instead of skipping");
    }
    let _ = writeln!(std::io::stderr(), "wireshark::{test}: SKIPPED: {why}");
    false
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("serval-wireshark-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running tshark and reading its fields.

/// Fields and their values, in the order tshark gave them.
type Fields = HashMap<String, Vec<String>>;

/// One decoded SAL packet (or, from `-T fields`, one frame): each field's values in the order
/// tshark found them, and the fields of each transport frame on their own.
#[derive(Debug, Default)]
struct Row {
    f: Fields,
    frames: Vec<Fields>,
}

impl Row {
    fn all(&self, field: &str) -> &[String] {
        self.f.get(field).map_or(&[], Vec::as_slice)
    }

    fn get(&self, field: &str) -> Option<&str> {
        self.all(field).first().map(String::as_str)
    }

    /// The field's only value (it must occur exactly once).
    fn one(&self, field: &str) -> &str {
        match self.all(field) {
            [v] => v,
            other => panic!("{field}: expected one value, got {other:?} in {self:?}"),
        }
    }

    fn num(&self, field: &str) -> u64 {
        let v = self.one(field);
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => v.parse(),
        }
        .unwrap_or_else(|e| panic!("{field}={v:?}: {e}"))
    }

    fn has(&self, field: &str) -> bool {
        !self.all(field).is_empty()
    }
}

/// Runs `tshark -r FILE -X lua_script:DISSECTOR EXTRA… -T fields -e FIELD…` and returns one
/// row per frame.
fn tshark(file: &Path, extra: &[&str], fields: &[&str]) -> Vec<Row> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
        .arg(file)
        .arg("-X")
        .arg(format!("lua_script:{DISSECTOR}"))
        .args(extra)
        .args(["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"])
        .args(["-E", "aggregator=|", "-E", "quote=n"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = support::output_within(cmd, b"", Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tshark failed: {stderr}");
    assert!(
        !stderr.to_lowercase().contains("lua"),
        "tshark reported a Lua problem: {stderr}"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), fields.len(), "{line}");
            let f = fields
                .iter()
                .zip(cols)
                .map(|(f, c)| {
                    let vals = if c.is_empty() {
                        Vec::new()
                    } else {
                        c.split('|').map(str::to_owned).collect()
                    };
                    ((*f).to_owned(), vals)
                })
                .collect();
            Row {
                f,
                frames: Vec::new(),
            }
        })
        .collect()
}

/// A boolean as `-T fields` prints it ("1"/"0" up to Wireshark 4.0, "True"/"False" later).
fn truthy(v: &str) -> bool {
    matches!(v, "1" | "True" | "true")
}

// ---------------------------------------------------------------------------------------------
// The captured session.

/// A free UDP port on `ip` (bound and released: the processes under test bind it next).
fn free_port(ip: &str) -> SocketAddr {
    UdpSocket::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// dumpcap on `lo`, capturing UDP on 127.0.0.0/24 to and from the given ports only, into a
/// file in `dir`. It runs for at most 5 minutes whatever happens.
struct Capture {
    dumpcap: Guard,
    file: PathBuf,
    /// The test's own socket: markers are sent to it, so the test knows what the file holds.
    marker: UdpSocket,
    /// dumpcap's stderr.
    err: std::sync::mpsc::Receiver<String>,
}

impl Capture {
    fn start(dir: &Path, ports: &[u16]) -> Capture {
        let marker = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut all: Vec<u16> = ports.to_vec();
        all.push(marker.local_addr().unwrap().port());
        let ports = all
            .iter()
            .map(|p| format!("port {p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let filter = format!("udp and net 127.0.0.0/24 and ({ports})");
        let file = dir.join("serval.pcapng");
        let mut child = Command::new("dumpcap")
            .args(["-i", "lo", "-f", &filter, "-a", "duration:300", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run dumpcap");
        let err = lines(child.stderr.take().unwrap());
        let dumpcap = Guard(child);
        // "Capturing on 'Loopback: lo'" once the filter is set; anything else it says before
        // exiting (no permission, no such device) is the reason it cannot capture.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut said = Vec::new();
        loop {
            match err.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains("Capturing on") => break,
                Ok(l) => said.push(l),
                Err(_) => panic!("dumpcap did not start capturing within 20 s: {said:?}"),
            }
        }
        let cap = Capture {
            dumpcap,
            file,
            marker,
            err,
        };
        // "Capturing on" comes once the filter is set; a marker seen in the file proves it.
        cap.sync("serval-wireshark-capture-started");
        cap
    }

    /// Sends `marker` to the marker socket every 20 ms until the capture file holds it:
    /// dumpcap writes what it captures in order, so everything sent before is in the file too.
    fn sync(&self, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let to = self.marker.local_addr().unwrap();
        loop {
            self.marker.send_to(marker.as_bytes(), to).unwrap();
            let held = std::fs::read(&self.file).unwrap_or_default();
            if held.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dumpcap did not write {marker} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until everything sent so far is in the file, stops dumpcap with SIGINT and waits
    /// for it; checks it dropped nothing, and returns the file and the marker port.
    fn stop(mut self) -> (PathBuf, u16) {
        self.sync("serval-wireshark-capture-done");
        let pid = nix::unistd::Pid::from_raw(self.dumpcap.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.dumpcap.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "dumpcap ignored SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
        // "Packets received/dropped on interface 'Loopback: lo': 47/0 (pcap:0/…) (100.0%)"
        let report = support::drain(&self.err);
        let counts = report
            .iter()
            .find(|l| l.contains("received/dropped"))
            .and_then(|l| l.rsplit(": ").next())
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no packet counts from dumpcap: {report:?}"));
        assert!(
            counts.ends_with("/0"),
            "dumpcap dropped packets: {report:?}"
        );
        (self.file.clone(), self.marker.local_addr().unwrap().port())
    }
}

/// The name the echo instance serves, and one nobody serves.
const NAME: &str = "echo.wireshark.test";
const NOBODY: &str = "nobody.wireshark.test";
const HELLO: &[u8] = b"hello wireshark\n";
const BEFORE: &[u8] = b"before the move\n";
const AFTER: &[u8] = b"after the move to 127.0.0.2\n";

/// Connects to `NAME` through `router` from `a` (an endpoint bound to `a` and `b`), echoes
/// `BEFORE`, migrates to `b`, echoes `AFTER`, and closes.
fn migrating_client(router: SocketAddr, a: SocketAddr, b: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let ep = serval::Endpoint::bind(&[a, b]).await.unwrap();
            ep.set_default_route(router);
            let mut s = ep
                .connect(ServiceId::from_name(NAME).unwrap())
                .await
                .unwrap();
            assert_eq!(s.local_locator().unwrap(), a);
            let mut buf = vec![0u8; BEFORE.len()];
            s.write_all(BEFORE).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, BEFORE);
            s.migrate(b).unwrap();
            let mut buf = vec![0u8; AFTER.len()];
            s.write_all(AFTER).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, AFTER);
            assert_eq!(s.local_locator().unwrap(), b);
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            s.closed().await;
        })
        .await
        .expect("the migrating client took over 30 s");
    });
}

impl Row {
    fn from(&self) -> SocketAddr {
        format!("{}:{}", self.one("ip.src"), self.one("udp.srcport"))
            .parse()
            .unwrap()
    }

    fn to(&self) -> SocketAddr {
        format!("{}:{}", self.one("ip.dst"), self.one("udp.dstport"))
            .parse()
            .unwrap()
    }

    fn frame(&self) -> u64 {
        self.num("frame.number")
    }

    /// The CONTROL flags of a control packet (None for a packet without CONTROL).
    fn flags(&self) -> Option<u16> {
        self.has("serval.flags")
            .then(|| u16::try_from(self.num("serval.flags")).unwrap())
    }

    fn flows(&self) -> (u64, u64) {
        (self.num("serval.src_flowid"), self.num("serval.dst_flowid"))
    }

    /// The STREAM frames: (offset, data, fin), in order.
    fn stream_frames(&self) -> Vec<(u64, Vec<u8>, bool)> {
        self.frames
            .iter()
            .filter(|f| f.contains_key("serval.stream.offset"))
            .map(|f| {
                let one = |k: &str| match f.get(k).map(Vec::as_slice) {
                    Some([v]) => v.clone(),
                    other => panic!("{k}: {other:?} in {f:?}"),
                };
                let len: usize = one("serval.stream.length").parse().unwrap();
                // A zero-length frame (a bare FIN) has no data field.
                let data = if len == 0 {
                    Vec::new()
                } else {
                    unhex(&one("serval.stream.data"))
                };
                assert_eq!(data.len(), len, "{f:?}");
                (
                    one("serval.stream.offset").parse().unwrap(),
                    data,
                    truthy(&one("serval.stream.fin")),
                )
            })
            .collect()
    }

    /// The packet numbers the ACK frames acknowledge.
    fn acked(&self) -> Vec<(u64, u64)> {
        self.all("serval.ack.range")
            .iter()
            .map(|r| {
                let (lo, hi) = r.split_once('-').unwrap();
                (lo.parse().unwrap(), hi.parse().unwrap())
            })
            .collect()
    }
}

/// The dissector's fields of type bytes.
const BYTES_FIELDS: &[&str] = &[
    "serval.service_id",
    "serval.nonce",
    "serval.auth_tag",
    "serval.ext.data",
    "serval.payload",
    "serval.stream.data",
    "serval.frame.datagram.data",
    "serval.dgram.service_id",
    "serval.dgram.data",
    "serval.reg.prefix_id",
];

/// Adds `value`, found under `key`, to `out`: strings as they are, arrays element by element,
/// objects (subtrees) field by field; each transport frame also goes to `frames` on its own.
fn collect(key: &str, value: &serde_json::Value, out: &mut Fields, frames: &mut Vec<Fields>) {
    use serde_json::Value;
    match value {
        // JSON shows bytes as colon-separated hex; `-T fields` (and these tests) as plain hex.
        Value::String(s) if BYTES_FIELDS.contains(&key) => {
            out.entry(key.to_owned())
                .or_default()
                .push(s.replace(':', ""));
        }
        Value::String(s) => out.entry(key.to_owned()).or_default().push(s.clone()),
        Value::Array(items) => {
            for item in items {
                collect(key, item, out, frames);
            }
        }
        Value::Object(map) if key == "serval.frame" => {
            let mut frame = Fields::new();
            for (k, v) in map {
                collect(k, v, &mut frame, &mut Vec::new());
            }
            for (k, v) in &frame {
                out.entry(k.clone()).or_default().extend(v.iter().cloned());
            }
            frames.push(frame);
        }
        Value::Object(map) => {
            for (k, v) in map {
                collect(k, v, out, frames);
            }
        }
        _ => {}
    }
}

/// The capture as tshark decodes it (`-T json`): one row per SAL packet, several for a
/// datagram holding a GSO batch, each with its frame's number, addresses and protocols; and
/// the frame numbers that held no SAL packet, with their protocols.
fn decode(file: &Path, skip_port: u16) -> (Vec<Row>, Vec<(u64, String)>) {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
        .arg(file)
        .arg("-X")
        .arg(format!("lua_script:{DISSECTOR}"))
        .args(["-o", "udp.try_heuristic_first:TRUE"])
        .args(["-T", "json", "--no-duplicate-keys"]);
    let out = support::output_within(cmd, b"", Duration::from_secs(120));
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let packets: serde_json::Value = serde_json::from_slice(&out.stdout).expect("tshark JSON");
    let (mut rows, mut undecoded) = (Vec::new(), Vec::new());
    for packet in packets.as_array().unwrap() {
        let layers = &packet["_source"]["layers"];
        let mut base = Fields::new();
        for proto in ["frame", "ip", "udp"] {
            if let Some(map) = layers[proto].as_object() {
                for k in [
                    "frame.number",
                    "frame.protocols",
                    "ip.src",
                    "ip.dst",
                    "udp.srcport",
                    "udp.dstport",
                    "udp.length",
                ] {
                    if let Some(v) = map.get(k).and_then(|v| v.as_str()) {
                        base.insert(k.to_owned(), vec![v.to_owned()]);
                    }
                }
            }
        }
        let frame = Row {
            f: base.clone(),
            frames: Vec::new(),
        };
        if frame.num("udp.srcport") == u64::from(skip_port) {
            continue;
        }
        let segments = match &layers["serval"] {
            serde_json::Value::Array(a) => a.clone(),
            serde_json::Value::Null => {
                undecoded.push((frame.frame(), frame.one("frame.protocols").to_owned()));
                continue;
            }
            one => vec![one.clone()],
        };
        for seg in &segments {
            let mut row = Row {
                f: base.clone(),
                frames: Vec::new(),
            };
            collect("serval", seg, &mut row.f, &mut row.frames);
            rows.push(row);
        }
    }
    (rows, undecoded)
}

/// One direction of a stream, from the STREAM frames of `rows`: the bytes (every frame must
/// agree with the others where they overlap, and no hole is allowed) and the FIN offset.
fn reassemble<'a>(rows: impl Iterator<Item = &'a Row>) -> (Vec<u8>, Option<u64>) {
    let mut at: BTreeMap<u64, u8> = BTreeMap::new();
    let mut fin = None;
    for row in rows {
        for (off, data, is_fin) in row.stream_frames() {
            for (i, b) in data.iter().enumerate() {
                let old = at.insert(off + i as u64, *b);
                assert!(
                    old.is_none() || old == Some(*b),
                    "frames disagree at {off}+{i}"
                );
            }
            if is_fin {
                let end = off + data.len() as u64;
                assert!(fin.is_none() || fin == Some(end), "two FIN offsets");
                fin = Some(end);
            }
        }
    }
    let bytes: Vec<u8> = at.values().copied().collect();
    assert_eq!(
        at.keys().last().map_or(0, |k| k + 1),
        bytes.len() as u64,
        "a hole in the stream"
    );
    (bytes, fin)
}

/// The packets between two locators (both ways), one line each, for failure messages.
fn listing(rows: &[Row], a: SocketAddr, b: SocketAddr) -> String {
    rows.iter()
        .filter(|r| (r.from(), r.to()) == (a, b) || (r.from(), r.to()) == (b, a))
        .map(|r| {
            format!(
                "\n  frame {} {} -> {} protocol {} flags {:?} frames {:?}",
                r.frame(),
                r.from(),
                r.to(),
                r.one("serval.protocol"),
                r.get("serval.flags"),
                r.stream_frames()
            )
        })
        .collect()
}

/// What a handshake looked like on the wire.
struct Handshake {
    /// The client's flowID and nonce (from its SYN).
    client_flow: u64,
    client_nonce: String,
    /// The instance's flowID (from its SYN-ACK).
    server_flow: u64,
}

/// Checks the connect by name from `client` through `router` to the instance at `inst`, as
/// docs/protocol.md §1 draws it, and returns its identifiers.
fn check_handshake(
    rows: &[Row],
    client: SocketAddr,
    router: SocketAddr,
    inst: SocketAddr,
    id: &ServiceId,
) -> Handshake {
    // The client's SYN to the router (retransmissions, if any, are the same SYN).
    let syns: Vec<&Row> = rows
        .iter()
        .filter(|r| r.from() == client && r.to() == router)
        .collect();
    assert!(!syns.is_empty(), "no SYN from {client} to the router");
    let syn = syns[0];
    for s in &syns {
        assert_eq!(s.flags(), Some(ControlFlags::SYN.bits()), "{s:?}");
        assert_eq!(s.num("serval.protocol"), 0);
        assert_eq!(s.one("serval.service_id"), id.to_string());
        assert_eq!(s.num("serval.dst_flowid"), 0);
        assert_eq!(s.all("serval.source.locator"), [client.to_string()]);
        assert_eq!(s.one("serval.nonce"), syn.one("serval.nonce"));
        assert_eq!(s.num("serval.src_flowid"), syn.num("serval.src_flowid"));
        assert_eq!(s.num("serval.verno"), syn.num("serval.verno"));
        assert!(!s.has("serval.auth_tag"), "a SYN carries no AUTH");
    }
    let client_flow = syn.num("serval.src_flowid");
    let client_verno = syn.num("serval.verno");
    let client_nonce = syn.one("serval.nonce").to_owned();
    assert_ne!(client_flow, 0);
    assert_eq!(client_nonce.len(), 32, "a 128-bit nonce");
    // Routers never see anything else of the connection.
    assert!(
        rows.iter()
            .all(|r| !(r.from() == router && r.to() == client)),
        "the router sent something to {client}"
    );

    // The router forwards it to the instance: hop limit one less, itself appended to SOURCE.
    let fwd = rows
        .iter()
        .find(|r| {
            r.from() == router
                && r.to() == inst
                && r.flags() == Some(ControlFlags::SYN.bits())
                && r.num("serval.src_flowid") == client_flow
        })
        .unwrap_or_else(|| panic!("the SYN of {client} was not forwarded to {inst}"));
    assert_eq!(fwd.one("serval.service_id"), id.to_string());
    assert_eq!(fwd.one("serval.nonce"), client_nonce);
    assert_eq!(fwd.num("serval.verno"), client_verno);
    assert_eq!(fwd.num("serval.hop_limit"), syn.num("serval.hop_limit") - 1);
    assert_eq!(
        fwd.all("serval.source.locator"),
        [client.to_string(), router.to_string()]
    );

    // The instance answers the client directly.
    let synack = rows
        .iter()
        .find(|r| {
            r.from() == inst
                && r.to() == client
                && r.flags() == Some((ControlFlags::SYN | ControlFlags::ACK).bits())
        })
        .unwrap_or_else(|| panic!("no SYN-ACK from {inst} to {client}"));
    let server_flow = synack.num("serval.src_flowid");
    let server_verno = synack.num("serval.verno");
    assert_ne!(server_flow, 0);
    assert_eq!(synack.num("serval.dst_flowid"), client_flow);
    assert_eq!(synack.num("serval.ackno"), (client_verno + 1) % (1 << 32));
    assert_eq!(synack.one("serval.nonce").len(), 32);
    assert_ne!(synack.one("serval.nonce"), client_nonce);
    assert_eq!(synack.one("serval.auth_tag").len(), 32, "a 128-bit tag");

    // The SYN-ACK is acknowledged: by a control packet with ACK and ackno = its verno + 1,
    // or by the client's first stream packet, which names both flowIDs (docs/protocol.md §1:
    // data completes the server's side of the handshake).
    let ack = rows
        .iter()
        .find(|r| {
            r.from() == client
                && r.to() == inst
                && (r.num("serval.protocol") == 1
                    || r.flags().is_some_and(|f| f & ControlFlags::ACK.bits() != 0))
        })
        .unwrap_or_else(|| {
            panic!(
                "the SYN-ACK was never acknowledged: {}",
                listing(rows, client, inst)
            )
        });
    assert_eq!(
        (ack.num("serval.src_flowid"), ack.num("serval.dst_flowid")),
        (client_flow, server_flow)
    );
    if ack.flags().is_some() {
        assert_eq!(ack.num("serval.ackno"), (server_verno + 1) % (1 << 32));
        assert!(ack.has("serval.auth_tag"));
    }
    assert!(ack.frame() > synack.frame() && synack.frame() > fwd.frame());
    Handshake {
        client_flow,
        client_nonce,
        server_flow,
    }
}

/// The registration of `prefix` by the instance at `inst` with `router`: REGISTER (weight 3,
/// the default 3 s lease asked) and its ACK, refreshes, and the UNREGISTER and its ACK.
fn check_registration(rows: &[Row], inst: SocketAddr, router: SocketAddr, prefix: &str) {
    let reg = |from: SocketAddr, to: SocketAddr, ty: u64| {
        rows.iter()
            .filter(move |r| r.from() == from && r.to() == to && r.get("serval.reg.type").is_some())
            .filter(move |r| r.num("serval.reg.type") == ty)
    };
    let register = reg(inst, router, 1).next().expect("no REGISTER");
    assert_eq!(register.one("serval.reg.prefix"), prefix);
    assert_eq!(register.num("serval.reg.weight"), 3);
    assert_eq!(register.num("serval.reg.priority"), 0);
    assert_eq!(register.num("serval.reg.ttl"), 3000);
    assert_eq!(register.num("serval.protocol"), 3);
    assert_eq!(register.flows(), (0, 0));
    assert_eq!(register.num("serval.hdr_len"), 20);
    assert_eq!(register.num("udp.length"), 8 + 80);
    let instance_token = register.one("serval.reg.instance");
    let answer = |req: &Row| {
        reg(router, inst, 3)
            .find(|r| r.one("serval.reg.request_id") == req.one("serval.reg.request_id"))
            .unwrap_or_else(|| panic!("no ACK of {req:?}"))
    };
    let ack = answer(register);
    assert_eq!(ack.one("serval.reg.prefix"), prefix);
    assert_eq!(ack.one("serval.reg.instance"), instance_token);
    assert_eq!(ack.num("serval.reg.ttl"), 3000);
    assert_eq!(ack.num("serval.reg.weight"), 3);
    // Refreshes use new request IDs from the same instance token.
    for r in reg(inst, router, 1) {
        assert_eq!(r.one("serval.reg.instance"), instance_token);
        assert_eq!(r.one("serval.reg.prefix"), prefix);
    }
    // On SIGTERM: UNREGISTER, answered with an ACK granting nothing.
    let unregister = reg(inst, router, 2).next().expect("no UNREGISTER");
    assert_eq!(unregister.one("serval.reg.prefix"), prefix);
    assert_eq!(unregister.one("serval.reg.instance"), instance_token);
    assert_ne!(
        unregister.one("serval.reg.request_id"),
        register.one("serval.reg.request_id")
    );
    let unreg_ack = answer(unregister);
    assert_eq!(unreg_ack.num("serval.reg.ttl"), 0);
    assert!(unreg_ack.frame() > unregister.frame());
}

/// The stream of the connect by name (`hs`) from `client`: demultiplexed by the flowIDs of the
/// SYN-ACK, `HELLO` both ways with a FIN after it, the client's data acknowledged, and a SAL FIN
/// from each end, acknowledged.
fn check_echo(rows: &[Row], hs: &Handshake, client: SocketAddr, inst: SocketAddr) {
    let (fc, fs) = (hs.client_flow, hs.server_flow);
    let up: Vec<&Row> = rows
        .iter()
        .filter(|r| r.from() == client && r.to() == inst)
        .collect();
    let down: Vec<&Row> = rows
        .iter()
        .filter(|r| r.from() == inst && r.to() == client)
        .collect();
    assert!(up.iter().all(|r| r.flows() == (fc, fs)), "{up:?}");
    assert!(down.iter().all(|r| r.flows() == (fs, fc)), "{down:?}");
    let data_up: Vec<&Row> = up
        .iter()
        .copied()
        .filter(|r| r.num("serval.protocol") == 1)
        .collect();
    let data_down: Vec<&Row> = down
        .iter()
        .copied()
        .filter(|r| r.num("serval.protocol") == 1)
        .collect();
    assert_eq!(
        reassemble(data_up.iter().copied()),
        (HELLO.to_vec(), Some(HELLO.len() as u64)),
        "what the client sent"
    );
    assert_eq!(
        reassemble(data_down.iter().copied()),
        (HELLO.to_vec(), Some(HELLO.len() as u64)),
        "what the instance echoed"
    );
    // The instance acknowledges the packet number that carried the client's first bytes.
    let pn = data_up
        .iter()
        .find(|r| {
            r.stream_frames()
                .iter()
                .any(|(off, d, _)| *off == 0 && !d.is_empty())
        })
        .expect("no packet with the client's first bytes")
        .num("serval.stream.pn");
    assert!(
        data_down
            .iter()
            .flat_map(|r| r.acked())
            .any(|(lo, hi)| lo <= pn && pn <= hi),
        "packet {pn} of the client never acknowledged"
    );
    // Both ends close with a SAL FIN, each acknowledged (the second FIN may carry the ACK of
    // the first).
    let has = |r: &Row, flag: ControlFlags| r.flags().is_some_and(|f| f & flag.bits() != 0);
    for (side, other) in [(&up, &down), (&down, &up)] {
        let fin = side
            .iter()
            .find(|r| has(r, ControlFlags::FIN))
            .expect("no SAL FIN");
        assert!(
            other.iter().any(|r| has(r, ControlFlags::ACK)
                && r.num("serval.ackno") == (fin.num("serval.verno") + 1) % (1 << 32)),
            "FIN {fin:?} not acknowledged"
        );
    }
}

/// The migration of the connection `hm` from `mover.0` to `mover.1`: RSYN from the new
/// locator, RSYN-ACK back to it, then the data from and to it only. Returns the frames of the
/// RSYN and the RSYN-ACK.
fn check_migration(
    rows: &[Row],
    hm: &Handshake,
    mover: (SocketAddr, SocketAddr),
    inst: SocketAddr,
) -> (u64, u64) {
    let (mover_a, mover_b) = mover;
    let (fm, fp) = (hm.client_flow, hm.server_flow);
    let rsyn = rows
        .iter()
        .find(|r| r.from() == mover_b && r.to() == inst && r.flags().is_some())
        .expect("no control packet from the new locator");
    assert_eq!(rsyn.flags(), Some(ControlFlags::RSYN.bits()));
    assert_eq!(rsyn.flows(), (fm, fp));
    assert!(rsyn.has("serval.auth_tag"));
    assert!(!rsyn.has("serval.service_id") && !rsyn.has("serval.nonce"));
    let rsyn_ack = rows
        .iter()
        .find(|r| r.from() == inst && r.to() == mover_b && r.flags().is_some())
        .expect("no control packet to the new locator");
    assert_eq!(
        rsyn_ack.flags(),
        Some((ControlFlags::RSYN | ControlFlags::ACK).bits())
    );
    assert_eq!(rsyn_ack.flows(), (fp, fm));
    assert_eq!(
        rsyn_ack.num("serval.ackno"),
        (rsyn.num("serval.verno") + 1) % (1 << 32)
    );
    assert!(rsyn_ack.frame() > rsyn.frame());
    let mover_up: Vec<&Row> = rows
        .iter()
        .filter(|r| [mover_a, mover_b].contains(&r.from()) && r.to() == inst)
        .filter(|r| r.num("serval.protocol") == 1)
        .collect();
    assert!(mover_up.iter().all(|r| r.flows() == (fm, fp)));
    let sent: Vec<u8> = [BEFORE, AFTER].concat();
    assert_eq!(
        reassemble(mover_up.iter().copied()),
        (sent.clone(), Some(sent.len() as u64))
    );
    // After the RSYN the mover sends only from 127.0.0.2, and after the RSYN-ACK the instance
    // sends only there; the bytes after the move left from there.
    for r in rows.iter().filter(|r| r.frame() > rsyn.frame()) {
        assert_ne!(
            r.from(),
            mover_a,
            "the mover still sent from its old locator: {r:?}"
        );
    }
    for r in rows.iter().filter(|r| r.frame() > rsyn_ack.frame()) {
        assert_ne!(
            r.to(),
            mover_a,
            "the instance still sent to the old locator: {r:?}"
        );
    }
    // The bytes written after the move left from 127.0.0.2 only.
    let mut from_b = 0;
    for r in &mover_up {
        for (off, data, _) in r.stream_frames() {
            if off + data.len() as u64 > BEFORE.len() as u64 {
                assert_eq!(r.from(), mover_b, "bytes after the move sent from {r:?}");
                from_b += data.len();
            }
        }
    }
    assert!(from_b >= AFTER.len(), "only {from_b} bytes from 127.0.0.2");
    let mover_down: Vec<&Row> = rows
        .iter()
        .filter(|r| r.from() == inst && [mover_a, mover_b].contains(&r.to()))
        .filter(|r| r.num("serval.protocol") == 1)
        .collect();
    assert_eq!(
        reassemble(mover_down.iter().copied()),
        (sent.clone(), Some(sent.len() as u64))
    );
    (rsyn.frame(), rsyn_ack.frame())
}

/// The NACK: a SYN from `nacked` for a name nobody serves, answered by the router with a
/// 50-byte NACK echoing its nonce (docs/protocol.md §1), and not forwarded. Returns the NACKs'
/// frames.
fn check_nack(rows: &[Row], nacked: SocketAddr, router: SocketAddr, hs: &Handshake) -> Vec<u64> {
    let nobody = ServiceId::from_name(NOBODY).unwrap();
    let syn = rows
        .iter()
        .find(|r| r.from() == nacked && r.to() == router)
        .expect("no SYN for the unknown name");
    assert_eq!(syn.flags(), Some(ControlFlags::SYN.bits()));
    assert_eq!(syn.one("serval.service_id"), nobody.to_string());
    let nacks: Vec<&Row> = rows
        .iter()
        .filter(|r| r.from() == router && r.to() == nacked)
        .collect();
    assert!(!nacks.is_empty(), "no NACK");
    for nack in &nacks {
        assert_eq!(nack.flags(), Some(ControlFlags::NACK.bits()));
        assert_eq!(nack.flows(), (0, syn.num("serval.src_flowid")));
        assert_eq!(
            nack.num("serval.ackno"),
            (syn.num("serval.verno") + 1) % (1 << 32)
        );
        assert_eq!(nack.one("serval.nonce"), syn.one("serval.nonce"));
        assert_eq!(nack.num("serval.hdr_len"), 50, "docs/protocol.md: 50 bytes");
        assert_eq!(nack.num("udp.length"), 8 + 50);
    }
    assert!(
        rows.iter()
            .all(|r| r.get("serval.service_id") != Some(&nobody.to_string()) || r.to() == router),
        "the SYN for the unknown name went past the router"
    );
    // The unknown name's SYN is a connection of its own.
    assert_ne!(syn.num("serval.src_flowid"), hs.client_flow);
    assert_ne!(syn.one("serval.nonce"), hs.client_nonce);
    nacks.iter().map(|r| r.frame()).collect()
}

#[test]
fn tshark_decodes_a_captured_session_to_the_values_sent() {
    if !tools_present(
        "tshark_decodes_a_captured_session_to_the_values_sent",
        &["tshark", "dumpcap"],
    ) {
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new("session");
    let router = free_port("127.0.0.1");
    let inst = free_port("127.0.0.1");
    let client = free_port("127.0.0.1");
    let nacked = free_port("127.0.0.1");
    let mover_a = free_port("127.0.0.1");
    let mover_b = free_port("127.0.0.2");
    let ports: Vec<u16> = [router, inst, client, nacked, mover_a, mover_b]
        .iter()
        .map(SocketAddr::port)
        .collect();
    let capture = Capture::start(&dir.0, &ports);

    let mut cmd = serval();
    cmd.args(["router", "--listen", &router.to_string()]);
    let (_router, ready, _router_log) = spawn_ready(cmd);
    assert_eq!(ready, router.to_string());

    // An echo instance of NAME, weight 3, registered with the router.
    let mut listen = serval()
        .args(["listen", NAME, "--bind", &inst.to_string(), "--echo"])
        .args(["--router", &router.to_string(), "--weight", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    let listen_log = lines(listen.stderr.take().unwrap());
    let mut listen = Guard(listen);
    wait_line(&listen_log, "registration", |l| l.contains("registered"));

    // A connect by name through the router.
    let mut cat = serval();
    cat.args(["cat", NAME, "--router", &router.to_string()])
        .args(["--bind", &client.to_string()]);
    let o = support::output_within(cat, HELLO, Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, HELLO);

    // A stream that moves from 127.0.0.1 to 127.0.0.2.
    migrating_client(router, mover_a, mover_b);

    // The instance stops: it unregisters on its way out.
    let pid = nix::unistd::Pid::from_raw(listen.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while listen.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "listen ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A name nobody serves: the router NACKs the SYN.
    let mut cat = serval();
    cat.args(["cat", NOBODY, "--router", &router.to_string()])
        .args(["--bind", &nacked.to_string()]);
    let o = support::output_within(cat, b"", Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no route to service"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let (file, marker_port) = capture.stop();
    if let Some(keep) = std::env::var_os("SERVAL_WIRESHARK_KEEP") {
        std::fs::copy(&file, &keep).unwrap();
    }
    let traffic = started.elapsed();
    let (rows, undecoded) = decode(&file, marker_port);
    // Every datagram of the session decodes as Serval, version 1, with nothing to complain of.
    assert_eq!(undecoded, [], "frames not decoded as Serval");
    assert!(rows.len() >= 20, "only {} packets captured", rows.len());
    for r in &rows {
        assert!(r.one("frame.protocols").ends_with(":serval"), "{r:?}");
        assert_eq!(r.one("serval.version"), "1", "{r:?}");
        assert!(!r.has("_ws.expert.message"), "{r:?}");
    }
    let batches = rows.iter().filter(|r| r.has("serval.gso.segment")).count();

    let echo_id = ServiceId::from_name(NAME).unwrap();
    check_registration(
        &rows,
        inst,
        router,
        &ServicePrefix::exact(echo_id).to_string(),
    );
    let hs = check_handshake(&rows, client, router, inst, &echo_id);
    check_echo(&rows, &hs, client, inst);
    let hm = check_handshake(&rows, mover_a, router, inst, &echo_id);
    let (rsyn, rsyn_ack) = check_migration(&rows, &hm, (mover_a, mover_b), inst);
    let nacks = check_nack(&rows, nacked, router, &hs);

    // The display filters: `serval` selects every decoded frame, `serval.flags.nack` the NACKs.
    let filtered = |filter: &str| -> Vec<u64> {
        tshark(
            &file,
            &["-o", "udp.try_heuristic_first:TRUE", "-Y", filter],
            &["frame.number"],
        )
        .iter()
        .map(Row::frame)
        .collect()
    };
    let mut all: Vec<u64> = rows.iter().map(Row::frame).collect();
    all.dedup();
    assert_eq!(filtered("serval"), all);
    assert_eq!(filtered("serval.flags.nack == 1"), nacks);
    let rsyns = filtered("serval.flags.rsyn == 1");
    assert!(
        rsyns.contains(&rsyn) && rsyns.contains(&rsyn_ack),
        "{rsyns:?}"
    );

    let _ = writeln!(
        std::io::stderr(),
        "wireshark: {} SAL packets in {} frames ({batches} of them in GSO batches) checked; \
         traffic {:.1} s, whole test {:.1} s",
        rows.len(),
        all.len(),
        traffic.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// The seeded corpus: the dissector against serval-wire.

/// xorshift64*: a fixed, seeded sequence (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// Well-formed packets of every shape: handshake packets, data, datagrams, registrations, and
/// headers with PAD and unknown skippable extensions.
fn templates(rng: &mut Rng) -> Vec<Vec<u8>> {
    let id = ServiceId::from_name("web.example.com").unwrap();
    let flow = |rng: &mut Rng| FlowId(rng.next() | 1);
    let nonce = |rng: &mut Rng| {
        let mut n = [0u8; 16];
        n.copy_from_slice(&rng.bytes(16));
        Nonce(n)
    };
    let mut out = Vec::new();

    let mut syn = SalRepr::new(Protocol::NONE, flow(rng), FlowId::NONE);
    syn.control = Some(ControlRepr {
        flags: ControlFlags::SYN,
        verno: rng.next() as u32,
        ackno: 0,
    });
    syn.service = Some(ServiceRepr { hop_limit: 16, id });
    syn.nonce = Some(nonce(rng));
    syn.source = vec![
        "192.0.2.1:40000".parse().unwrap(),
        "[2001:db8::7]:54324".parse().unwrap(),
        "198.51.100.9:54324".parse().unwrap(),
    ];
    out.push(syn.to_bytes(&[]).unwrap());

    let mut synack = SalRepr::new(Protocol::NONE, flow(rng), flow(rng));
    synack.control = Some(ControlRepr {
        flags: ControlFlags::SYN | ControlFlags::ACK,
        verno: rng.next() as u32,
        ackno: rng.next() as u32,
    });
    synack.nonce = Some(nonce(rng));
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&rng.bytes(16));
    synack.auth = Some(tag);
    out.push(synack.to_bytes(&[]).unwrap());

    for flags in [
        ControlFlags::RSYN,
        ControlFlags::NACK,
        ControlFlags::RST,
        ControlFlags::FIN | ControlFlags::ACK,
    ] {
        let mut c = SalRepr::new(Protocol::NONE, flow(rng), flow(rng));
        c.control = Some(ControlRepr {
            flags,
            verno: rng.next() as u32,
            ackno: rng.next() as u32,
        });
        c.auth = Some(tag);
        out.push(c.to_bytes(&[]).unwrap());
    }

    // Opaque payloads (protocol 0 and unassigned protocols carry bytes the dissector shows as
    // they are).
    let payload = rng.bytes(24);
    out.push(
        SalRepr::new(Protocol::NONE, flow(rng), flow(rng))
            .to_bytes(&payload)
            .unwrap(),
    );
    out.push(
        SalRepr::new(Protocol(9), flow(rng), flow(rng))
            .to_bytes(&payload)
            .unwrap(),
    );

    let mut dgram = SalRepr::new(Protocol::DATAGRAM, FlowId::NONE, FlowId::NONE);
    dgram.service = Some(ServiceRepr { hop_limit: 8, id });
    dgram.source = vec!["10.0.0.1:5000".parse().unwrap()];
    let mut body = vec![1u8];
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(b"datagram");
    out.push(dgram.to_bytes(&body).unwrap());

    let prefix = ServicePrefix::from_domain("example.com").unwrap();
    let register = RegistrationRepr::register(rng.next() as u32, rng.next(), prefix, 3, 7, 3000);
    out.push(register.to_packet().to_vec());
    out.push(register.ack(2500).to_packet().to_vec());
    out.push(register.unregister(5).to_packet().to_vec());
    out.push(
        register
            .reject(RejectReason::NOT_ACCEPTED)
            .to_packet()
            .to_vec(),
    );
    let exact = RegistrationRepr::register(1, 2, ServicePrefix::exact(id), 1, 0, 0);
    out.push(exact.to_packet().to_vec());

    // PAD and an unknown extension without the must-understand bit, spliced in by hand.
    let mut base = SalRepr::new(Protocol::NONE, flow(rng), flow(rng))
        .to_bytes(&payload)
        .unwrap();
    base.splice(20..20, [0x00, 4, 0, 0, 0x07, 3, 0xaa]);
    let hdr_len = 27u16.to_be_bytes();
    base[2..4].copy_from_slice(&hdr_len);
    out.push(base);
    out
}

/// The extensions of a header whose extensions are at least delimited correctly.
fn split_exts(p: &[u8]) -> Option<Vec<Vec<u8>>> {
    let hdr_len = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
    if p.len() < 20 || hdr_len > p.len() {
        return None;
    }
    let (mut out, mut i) = (Vec::new(), 20);
    while i < hdr_len {
        let len = usize::from(*p.get(i + 1)?);
        if len < 2 || i + len > hdr_len {
            return None;
        }
        out.push(p[i..i + len].to_vec());
        i += len;
    }
    Some(out)
}

/// `p` with its extensions replaced by `exts` (and its header length to match).
fn join_exts(p: &[u8], exts: &[Vec<u8>]) -> Vec<u8> {
    let hdr_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let mut out = p[..20].to_vec();
    for e in exts {
        out.extend_from_slice(e);
    }
    let new = u16::try_from(out.len()).unwrap().to_be_bytes();
    out[2..4].copy_from_slice(&new);
    out.extend_from_slice(&p[hdr_len..]);
    out
}

/// Breaks the rules between extensions or inside SOURCE: two extensions swapped, a PAD
/// first, or a SOURCE emptied, cut inside a locator, or given a locator twice.
fn restructure(rng: &mut Rng, mut exts: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    if exts.is_empty() {
        return exts;
    }
    let source = exts.iter().position(|e| e[0] == 0x84);
    match (rng.below(5), source) {
        (0, _) => {
            let (i, j) = (rng.below(exts.len()), rng.below(exts.len()));
            exts.swap(i, j);
        }
        (1, _) => exts.insert(0, vec![0x00, 2]),
        (2, Some(s)) => exts[s] = vec![0x84, 2],
        (3, Some(s)) if exts[s].len() > 2 => {
            exts[s].pop();
            exts[s][1] -= 1;
        }
        (_, Some(s)) => {
            let first = usize::from(if exts[s].get(2) == Some(&6) { 19u8 } else { 7 });
            if exts[s].len() >= 2 + first && exts[s].len() + first <= 255 {
                let copy = exts[s][2..2 + first].to_vec();
                exts[s].extend_from_slice(&copy);
                exts[s][1] = u8::try_from(exts[s].len()).unwrap();
            }
        }
        _ => {}
    }
    exts
}

/// Mutates `p` once: a byte, the header length, the length, a run of header bytes, or the
/// structure of the extensions.
fn mutate(rng: &mut Rng, p: &mut Vec<u8>) {
    const INTERESTING: [u8; 16] = [
        0, 1, 2, 3, 4, 6, 7, 12, 18, 36, 0x10, 0x20, 0x81, 0x84, 0x85, 0xff,
    ];
    let hdr_len = if p.len() >= 4 {
        usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len())
    } else {
        p.len()
    };
    match rng.below(10) {
        8 | 9 => {
            if let Some(exts) = split_exts(p) {
                let exts = restructure(rng, exts);
                *p = join_exts(p, &exts);
            }
        }
        0 | 1 if !p.is_empty() => {
            // A byte of the header, most often (where the rules are).
            let i = rng.below(hdr_len.max(1));
            p[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        2 if !p.is_empty() => {
            let i = rng.below(p.len());
            p[i] = rng.byte();
        }
        3 if p.len() >= 4 => {
            let v = (rng.below(p.len() + 8) as u16).to_be_bytes();
            p[2..4].copy_from_slice(&v);
        }
        4 => p.truncate(rng.below(p.len() + 1)),
        5 => {
            let n = rng.below(12);
            let extra = rng.bytes(n);
            p.extend_from_slice(&extra);
        }
        6 if hdr_len > 22 => {
            // Repeat a run of header bytes inside the header (a duplicate or an overlap).
            let from = 20 + rng.below(hdr_len - 20);
            let len = 1 + rng.below((hdr_len - from).min(40));
            let run = p[from..from + len].to_vec();
            let at = 20 + rng.below(hdr_len - 20);
            p.splice(at..at, run);
            let new = u16::try_from(hdr_len + len).unwrap().to_be_bytes();
            p[2..4].copy_from_slice(&new);
        }
        _ if p.len() > 20 => {
            // A registration field, or the flowIDs of a registration.
            let i = 20 + rng.below(p.len() - 20);
            p[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        _ => {}
    }
}

/// A classic pcap file of Ethernet/IPv4/UDP frames from 127.0.0.1:40000 to `127.0.0.1:port`.
fn write_pcap(path: &Path, packets: &[(u16, Vec<u8>)]) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // Ethernet
    for (i, (port, payload)) in packets.iter().enumerate() {
        let udp_len = u16::try_from(8 + payload.len()).unwrap();
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&[0x45, 0]);
        frame.extend_from_slice(&(20 + udp_len).to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1]);
        frame.extend_from_slice(&40_000u16.to_be_bytes());
        frame.extend_from_slice(&port.to_be_bytes());
        frame.extend_from_slice(&udp_len.to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(payload);
        let len = u32::try_from(frame.len()).unwrap();
        out.extend_from_slice(&u32::try_from(i).unwrap().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&frame);
    }
    std::fs::write(path, out).unwrap();
}

/// The name of an error variant, as the dissector's messages begin: `ExtOverrun { .. }` →
/// `ExtOverrun`.
fn variant(debug: String) -> String {
    debug
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect()
}

/// What the UDP heuristic should claim: a header `serval-wire` accepts, of a protocol version
/// 1 defines, and for a registration the exact 80 bytes with zero flowIDs.
fn heuristic_claims(p: &[u8]) -> bool {
    let Ok(pkt) = SalPacket::new_checked(p) else {
        return false;
    };
    match pkt.protocol() {
        Protocol::REGISTRATION => {
            pkt.payload().len() == 60 && pkt.src_flow().is_none() && pkt.dst_flow().is_none()
        }
        p => p.is_known(),
    }
}

#[test]
fn tshark_agrees_with_serval_wire_on_valid_and_malformed_packets() {
    if !tools_present(
        "tshark_agrees_with_serval_wire_on_valid_and_malformed_packets",
        &["tshark"],
    ) {
        return;
    }
    let dir = TempDir::new("corpus");
    let mut rng = Rng(0x5e4a_1c0d_e5ee_d001);
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    for round in 0..120 {
        for t in templates(&mut rng) {
            let mut p = t;
            // Round 0 keeps the templates intact; later rounds mutate 1 to 3 times.
            if round > 0 {
                for _ in 0..=rng.below(3) {
                    mutate(&mut rng, &mut p);
                }
            }
            // A UDP datagram with no payload reaches no dissector.
            if !p.is_empty() {
                corpus.push(p);
            }
        }
    }
    // The same packets on the default port (54324, registered) and on port 40001, where only
    // the heuristic can claim them.
    let frames: Vec<(u16, Vec<u8>)> = corpus
        .iter()
        .map(|p| (54_324, p.clone()))
        .chain(corpus.iter().map(|p| (40_001, p.clone())))
        .collect();
    let file = dir.0.join("corpus.pcap");
    write_pcap(&file, &frames);
    let rows = tshark(
        &file,
        &[],
        &[
            "frame.number",
            "frame.protocols",
            "serval.malformed",
            "serval.reg.malformed",
            "serval.internal_error",
            "_ws.expert.message",
            "serval.protocol",
            "serval.hdr_len",
            "serval.src_flowid",
            "serval.dst_flowid",
            "serval.flags",
            "serval.verno",
            "serval.ackno",
            "serval.hop_limit",
            "serval.service_id",
            "serval.nonce",
            "serval.source.locator",
            "serval.auth_tag",
            "serval.reg.type",
            "serval.reg.reason",
            "serval.reg.prefix",
            "serval.reg.request_id",
            "serval.reg.instance",
            "serval.reg.weight",
            "serval.reg.priority",
            "serval.reg.ttl",
            "serval.dgram.service_id",
            "serval.dgram.data",
            "serval.payload",
        ],
    );
    assert_eq!(rows.len(), frames.len());

    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let (mut valid, mut claimed) = (0, 0);
    for (row, (port, p)) in rows.iter().zip(&frames) {
        let ctx = || format!("frame {}: {} on port {port}: {row:?}", row.frame(), hex(p));
        assert!(!row.has("serval.internal_error"), "{}", ctx());
        let decoded = row.one("frame.protocols").ends_with(":serval");
        if *port == 40_001 {
            assert_eq!(decoded, heuristic_claims(p), "heuristic: {}", ctx());
            claimed += usize::from(decoded);
            if !decoded {
                continue;
            }
        } else {
            assert!(decoded, "{}", ctx());
        }
        let messages = row.all("_ws.expert.message");
        let says = |name: &str| messages.iter().any(|m| m.starts_with(&format!("{name}:")));
        let pkt = SalPacket::new_unchecked(&p[..]);
        match pkt.validate() {
            Err(e) => {
                let name = variant(format!("{e:?}"));
                assert!(row.has("serval.malformed"), "{name} missed: {}", ctx());
                assert!(says(&name), "{name} expected: {}", ctx());
                *errors.entry(name).or_default() += 1;
                continue;
            }
            Ok(()) => assert!(!row.has("serval.malformed"), "{}", ctx()),
        }
        valid += 1;
        // A valid header: every field as serval-wire reads it.
        let repr = SalRepr::parse(&SalPacket::new_checked(&p[..]).unwrap()).unwrap();
        assert_eq!(
            row.num("serval.protocol"),
            u64::from(repr.protocol.0),
            "{}",
            ctx()
        );
        assert_eq!(row.num("serval.hdr_len"), u64::from(pkt.header_len()));
        assert_eq!(row.num("serval.src_flowid"), repr.src_flow.0, "{}", ctx());
        assert_eq!(row.num("serval.dst_flowid"), repr.dst_flow.0);
        match repr.control {
            Some(c) => {
                assert_eq!(row.num("serval.flags") & 0x3f, u64::from(c.flags.bits()));
                assert_eq!(row.num("serval.verno"), u64::from(c.verno));
                assert_eq!(row.num("serval.ackno"), u64::from(c.ackno));
            }
            None => assert!(!row.has("serval.flags"), "{}", ctx()),
        }
        match repr.service {
            Some(s) => {
                assert_eq!(row.num("serval.hop_limit"), u64::from(s.hop_limit));
                assert_eq!(row.one("serval.service_id"), s.id.to_string());
            }
            None => assert!(!row.has("serval.service_id"), "{}", ctx()),
        }
        assert_eq!(
            row.get("serval.nonce").map(str::to_owned),
            repr.nonce.map(|n| hex(&n.0))
        );
        assert_eq!(
            row.get("serval.auth_tag").map(str::to_owned),
            repr.auth.map(|t| hex(&t))
        );
        let locators: Vec<String> = repr.source.iter().map(ToString::to_string).collect();
        assert_eq!(row.all("serval.source.locator"), locators, "{}", ctx());
        let payload = pkt.payload();
        match repr.protocol {
            Protocol::REGISTRATION => {
                match RegistrationRepr::parse_packet(&SalPacket::new_checked(&p[..]).unwrap()) {
                    Err(e) => {
                        let name = variant(format!("{e:?}"));
                        assert!(row.has("serval.reg.malformed"), "{name}: {}", ctx());
                        assert!(says(&name), "{name} expected: {}", ctx());
                        *errors.entry(format!("registration {name}")).or_default() += 1;
                    }
                    Ok(r) => {
                        assert!(!row.has("serval.reg.malformed"), "{}", ctx());
                        assert_eq!(row.num("serval.reg.type"), u64::from(r.ty.code()));
                        assert_eq!(row.num("serval.reg.reason"), u64::from(r.ty.reason_code()));
                        assert_eq!(row.one("serval.reg.prefix"), r.prefix.to_string());
                        assert_eq!(row.num("serval.reg.request_id"), u64::from(r.request_id));
                        assert_eq!(row.num("serval.reg.instance"), r.instance);
                        assert_eq!(row.num("serval.reg.weight"), u64::from(r.weight));
                        assert_eq!(row.num("serval.reg.priority"), u64::from(r.priority));
                        assert_eq!(row.num("serval.reg.ttl"), u64::from(r.ttl_ms));
                    }
                }
            }
            Protocol::DATAGRAM => {
                if let Some((&1, rest)) = payload.split_first()
                    && rest.len() >= 32
                {
                    assert_eq!(row.one("serval.dgram.service_id"), hex(&rest[..32]));
                    if rest.len() > 32 {
                        assert_eq!(row.one("serval.dgram.data"), hex(&rest[32..]));
                    }
                }
            }
            Protocol(0) | Protocol(4..=255) if !payload.is_empty() => {
                assert_eq!(row.one("serval.payload"), hex(payload), "{}", ctx());
            }
            _ => {}
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "wireshark: {} packets ({valid} valid, {claimed} claimed by the heuristic); errors \
         named as serval-wire names them: {errors:?}",
        corpus.len()
    );
    // The corpus is worth something only if it reaches the rules: most of them, both ways.
    assert!(valid > 200, "only {valid} valid packets");
    assert!(claimed > 100, "the heuristic claimed only {claimed}");
    assert!(
        errors.len() >= 20,
        "only these errors were reached: {errors:?}"
    );
}

/// A stream packet of flow 7 → 9: packet number `pn`, a STREAM frame, padded to `pad_to`.
fn stream_packet(pn: u64, offset: u8, data: &[u8], fin: bool, pad_to: usize) -> Vec<u8> {
    let mut payload = pn.to_be_bytes().to_vec();
    payload.extend_from_slice(&[if fin { 0x09 } else { 0x08 }, offset]);
    payload.push(u8::try_from(data.len()).unwrap());
    payload.extend_from_slice(data);
    let mut p = SalRepr::new(Protocol::STREAM, FlowId(7), FlowId(9))
        .to_bytes(&payload)
        .unwrap();
    p.resize(p.len().max(pad_to), 0);
    p
}

#[test]
fn tshark_splits_a_gso_batch_into_its_packets() {
    if !tools_present("tshark_splits_a_gso_batch_into_its_packets", &["tshark"]) {
        return;
    }
    let dir = TempDir::new("gso");
    // What a capture on the sending host holds for one sendmsg with UDP_SEGMENT = 120: three
    // packets of one flow back to back, the last shorter. A PADDING run ends each full one.
    let mut batch = stream_packet(40, 0, b"first", false, 120);
    batch.extend(stream_packet(41, 5, b"second", false, 120));
    batch.extend(stream_packet(42, 11, b"end", true, 0));
    // Not a batch: a packet whose payload quotes another flow's header.
    let mut quoting = stream_packet(43, 0, b"x", false, 0);
    let other = SalRepr::new(Protocol::STREAM, FlowId(8), FlowId(9))
        .to_bytes(&[0; 8])
        .unwrap();
    quoting.push(0x08);
    quoting.push(0);
    quoting.push(u8::try_from(other.len()).unwrap());
    quoting.extend(&other);
    // A control packet and a stream packet of one flow in one batch, as a client sends its
    // handshake ACK and first bytes: segment size 50 (the control packet), the last shorter.
    let mut ack = SalRepr::new(Protocol::NONE, FlowId(7), FlowId(9));
    ack.control = Some(ControlRepr {
        flags: ControlFlags::ACK,
        verno: 0,
        ackno: 1234,
    });
    ack.auth = Some([0xab; 16]);
    let mut mixed = ack.to_bytes(&[]).unwrap();
    assert_eq!(mixed.len(), 50);
    mixed.extend(stream_packet(0, 0, b"mixed batch", false, 0));
    let file = dir.0.join("gso.pcap");
    write_pcap(
        &file,
        &[(40_002, batch), (40_002, quoting), (40_002, mixed)],
    );
    let rows = tshark(
        &file,
        &[],
        &[
            "serval.gso.segment",
            "serval.gso.segments",
            "serval.gso.segment_size",
            "serval.src_flowid",
            "serval.stream.pn",
            "serval.stream.offset",
            "serval.stream.fin",
            "serval.stream.data",
            "serval.protocol",
            "serval.flags",
            "serval.ackno",
            "_ws.expert.message",
        ],
    );
    assert_eq!(rows.len(), 3);
    let b = &rows[0];
    assert_eq!(b.all("serval.gso.segment"), ["1", "2", "3"]);
    assert_eq!(b.all("serval.gso.segments"), ["3", "3", "3"]);
    assert_eq!(b.all("serval.gso.segment_size"), ["120", "120", "120"]);
    assert_eq!(b.all("serval.src_flowid"), ["0x0000000000000007"; 3]);
    assert_eq!(b.all("serval.stream.pn"), ["40", "41", "42"]);
    assert_eq!(b.all("serval.stream.offset"), ["0", "5", "11"]);
    let fins: Vec<bool> = b
        .all("serval.stream.fin")
        .iter()
        .map(|v| truthy(v))
        .collect();
    assert_eq!(fins, [false, false, true]);
    assert_eq!(
        b.all("serval.stream.data"),
        [hex(b"first"), hex(b"second"), hex(b"end")]
    );
    assert!(!b.has("_ws.expert.message"), "{b:?}");
    let q = &rows[1];
    assert!(!q.has("serval.gso.segment"), "{q:?}");
    assert_eq!(q.all("serval.stream.pn"), ["43"]);
    assert_eq!(q.all("serval.stream.data"), [hex(b"x"), hex(&other)]);
    let m = &rows[2];
    assert_eq!(m.all("serval.gso.segment"), ["1", "2"]);
    assert_eq!(m.all("serval.gso.segment_size"), ["50", "50"]);
    assert_eq!(m.all("serval.protocol"), ["0", "1"]);
    assert_eq!(m.all("serval.flags"), ["0x0002"]);
    assert_eq!(m.all("serval.ackno"), ["1234"]);
    assert_eq!(m.all("serval.stream.data"), [hex(b"mixed batch")]);
    assert!(!m.has("_ws.expert.message"), "{m:?}");
}
