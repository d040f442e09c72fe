//! The Wireshark dissector `contrib/wireshark/serval.lua`, run by tshark:
//!
//! * on the project's own traffic, captured on loopback with dumpcap while a router, an echo
//!   instance and clients make a registration, a connect by name, a migration, a request to
//!   move the server's end and its refusal, an unregistration and a NACK: every decoded field must equal what was sent (serviceIDs,
//!   flowIDs, flags, verno/ackno, nonces, key shares, SOURCE locators, registration fields and
//!   cookies, packet numbers and tags, stream bytes and offsets, ACK ranges). The flows whose
//!   frames are checked run in plaintext (`--plaintext` at both ends: still tagged, not
//!   encrypted); one more connect runs encrypted, as by default, and its payloads must show as
//!   encrypted bytes, the bytes it sent must appear nowhere in the capture, and every packet
//!   of it after the SYN must show its tag;
//! * on a seeded corpus of valid and mutated packets written to a pcap file: the dissector must
//!   call a packet malformed exactly when `serval-wire` refuses it, name the same error, and
//!   decode the valid ones to the values `serval-wire` reads (and the packet number, payload
//!   and tag of a protected packet where docs/wire.md §12 puts them); its UDP heuristic must
//!   claim exactly the packets whose header validates;
//! * on GSO batches and on a plaintext flow's packets before and after its SYN-ACK, in one and
//!   in two passes.
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
    ControlFlags, ControlRepr, Cookie, FlowId, KeyShareRepr, Nonce, Protocol, RegistrationRepr,
    RejectReason, SalPacket, SalRepr, ServiceId, ServicePrefix, ServiceRepr, Signature,
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
/// The agent the migrating client's MOVE_REQUEST names (nothing there: the flow stays).
const MOVE_TO: &str = "127.0.0.9:4242";
/// What the encrypted session sends: it must not appear in the capture.
const SECRET: &[u8] = b"only the two ends may read this line\n";

/// Connects to `NAME` through `router` from `a` (an endpoint bound to `a` and `b`, asking for
/// plaintext), echoes `BEFORE`, migrates to `b`, echoes `AFTER`, and closes.
fn migrating_client(router: SocketAddr, a: SocketAddr, b: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let config = serval::EndpointConfig {
                protection: serval::Protection::Plaintext,
                ..serval::EndpointConfig::default()
            };
            let ep = serval::Endpoint::bind_with(&[a, b], config).await.unwrap();
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
            // One MOVE_REQUEST (docs/wire.md §15), which the instance, running no migration
            // agent, refuses with one MOVE_REFUSED.
            let asked = tokio::time::timeout(
                Duration::from_secs(5),
                s.request_move(MOVE_TO.parse().unwrap()),
            );
            let refused = asked.await.expect("an answer").unwrap_err();
            assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
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

    /// Whether the KEYSHARE asks for (SYN) or grants (SYN-ACK) plaintext.
    fn keyshare_plaintext(&self) -> bool {
        assert_eq!(self.num("serval.keyshare.group"), 1, "X25519: {self:?}");
        assert_eq!(
            self.one("serval.keyshare.key").len(),
            64,
            "a 32-byte key: {self:?}"
        );
        truthy(self.one("serval.keyshare.plaintext"))
    }

    /// Checks the layout of a protected packet (docs/wire.md §12): a packet number in the
    /// space its CONTROL extension (or its absence) names, a 128-bit tag, no AUTH extension,
    /// and the mode of its flow as its SYN-ACK (frame `synack`) set it.
    fn assert_protected(&self, synack: u64, plaintext: bool) {
        let space = if self.flags().is_some() {
            "control"
        } else {
            "data"
        };
        assert_eq!(self.one("serval.pn.space"), space, "{self:?}");
        self.num("serval.pn");
        assert_eq!(self.one("serval.tag").len(), 32, "a 128-bit tag: {self:?}");
        assert!(
            !self.has("serval.auth_tag"),
            "AUTH is no longer sent: {self:?}"
        );
        assert_eq!(self.num("serval.flow.synack"), synack, "{self:?}");
        assert_eq!(
            truthy(self.one("serval.flow.plaintext")),
            plaintext,
            "{self:?}"
        );
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
    "serval.keyshare.key",
    "serval.cookie",
    "serval.auth_tag",
    "serval.encrypted",
    "serval.tag",
    "serval.reg.cookie",
    "serval.reg.signature",
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
    /// The frame of the SYN-ACK.
    synack: u64,
}

/// Checks the connect by name from `client` through `router` to the instance at `inst`, as
/// docs/protocol.md §1 draws it, asking for plaintext if `plaintext` (and granted it, the
/// instance allowing it), and returns its identifiers.
fn check_handshake(
    rows: &[Row],
    client: SocketAddr,
    router: SocketAddr,
    inst: SocketAddr,
    id: &ServiceId,
    plaintext: bool,
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
        assert_eq!(s.keyshare_plaintext(), plaintext, "{s:?}");
        assert_eq!(s.one("serval.keyshare.key"), syn.one("serval.keyshare.key"));
        // The SYN is not protected: no packet number, no tag, no AUTH.
        assert!(!s.has("serval.auth_tag") && !s.has("serval.tag") && !s.has("serval.pn"));
        assert_eq!(s.num("udp.length"), 8 + s.num("serval.hdr_len"), "{s:?}");
        assert!(!s.has("serval.gso.segment"));
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
    assert_eq!(
        fwd.one("serval.keyshare.key"),
        syn.one("serval.keyshare.key")
    );
    assert_eq!(fwd.keyshare_plaintext(), plaintext);
    assert!(!fwd.has("serval.tag"));

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
    // The server's own key share, granting plaintext exactly when asked (the instance allows
    // it); the SYN-ACK is the first protected packet, the first of the control space, and its
    // own frame decides its flow's mode.
    assert_eq!(synack.keyshare_plaintext(), plaintext, "{synack:?}");
    assert_ne!(
        synack.one("serval.keyshare.key"),
        syn.one("serval.keyshare.key")
    );
    synack.assert_protected(synack.frame(), plaintext);
    assert_eq!(synack.num("serval.pn"), 0);
    assert!(!synack.has("serval.encrypted") && !synack.has("serval.payload"));
    // Header, packet number and tag, nothing else.
    if !synack.has("serval.gso.segment") {
        assert_eq!(
            synack.num("udp.length"),
            8 + synack.num("serval.hdr_len") + 8 + 16
        );
    }

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
    }
    ack.assert_protected(synack.frame(), plaintext);
    assert!(ack.frame() > synack.frame() && synack.frame() > fwd.frame());
    Handshake {
        client_flow,
        client_nonce,
        server_flow,
        synack: synack.frame(),
    }
}

/// The registration of `prefix` by the instance at `inst` with `router`: REGISTER (weight 3,
/// the default 3 s lease asked, cookie form, no cookie yet), the router's COOKIE, the REGISTER
/// again with that cookie and its ACK, refreshes, and the UNREGISTER and its ACK
/// (docs/wire.md §11.2).
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
    // The cookie form, unsigned (the instance has no key): 76 bytes of payload.
    assert_eq!(register.num("udp.length"), 8 + 96);
    assert!(!register.has("serval.reg.signature"));
    assert_eq!(
        register.one("serval.reg.cookie"),
        "00".repeat(16),
        "no cookie yet"
    );
    assert!(!register.has("serval.tag") && !register.has("serval.pn"));
    let instance_token = register.one("serval.reg.instance");
    let same_request =
        |a: &Row, b: &Row| a.one("serval.reg.request_id") == b.one("serval.reg.request_id");
    let answer = |req: &Row| {
        reg(router, inst, 3)
            .find(|r| same_request(r, req))
            .unwrap_or_else(|| panic!("no ACK of {req:?}"))
    };
    // The router stores nothing before the instance proves it receives there: COOKIE (type 5,
    // TTL 0, a fresh cookie), and the same request again with that cookie.
    let cookie = reg(router, inst, 5)
        .find(|r| same_request(r, register))
        .expect("no COOKIE");
    assert_eq!(cookie.num("udp.length"), 8 + 96);
    assert_eq!(cookie.num("serval.reg.ttl"), 0);
    assert_eq!(cookie.one("serval.reg.prefix"), prefix);
    assert_eq!(cookie.one("serval.reg.instance"), instance_token);
    assert_ne!(cookie.one("serval.reg.cookie"), "00".repeat(16));
    let again = reg(inst, router, 1)
        .find(|r| same_request(r, register) && r.frame() > cookie.frame())
        .expect("no REGISTER with the cookie");
    assert_eq!(
        again.one("serval.reg.cookie"),
        cookie.one("serval.reg.cookie")
    );
    let ack = answer(register);
    assert!(ack.frame() > again.frame());
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

/// The stream of the plaintext connect by name (`hs`) from `client`: demultiplexed by the
/// flowIDs of the SYN-ACK, every packet protected (packet number and tag) but readable,
/// `HELLO` both ways with a FIN after it, the client's data acknowledged, and a SAL FIN from
/// each end, acknowledged.
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
    for r in up.iter().chain(&down) {
        r.assert_protected(hs.synack, true);
        assert!(!r.has("serval.encrypted"), "{r:?}");
    }
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
        .num("serval.pn");
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
    rsyn.assert_protected(hm.synack, true);
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
    rsyn_ack.assert_protected(hm.synack, true);
    // Packet numbers are never reused in a space and direction, across the move too.
    for (from, to) in [
        (&[mover_a, mover_b][..], &[inst][..]),
        (&[inst], &[mover_a, mover_b]),
    ] {
        for space in ["control", "data"] {
            let pns: Vec<u64> = rows
                .iter()
                .filter(|r| from.contains(&r.from()) && to.contains(&r.to()))
                .filter(|r| r.get("serval.pn.space") == Some(space))
                .map(|r| r.num("serval.pn"))
                .collect();
            assert!(!pns.is_empty(), "no {space} packet from {from:?}");
            let mut unique = pns.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(
                unique.len(),
                pns.len(),
                "{space} packet numbers reused: {pns:?}"
            );
        }
    }
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
    // The move is make-before-break (docs/protocol.md §4): until the RSYN-ACK validates the
    // new path the mover may still use the old one, and packets it queued for the old socket
    // before reading the RSYN-ACK can leave after ones from the new socket (the runtime
    // flushes each socket's batch in turn), so the capture's order proves nothing on that
    // side. What must hold: the mover closes from the new locator, and after the RSYN-ACK
    // the instance sends only to 127.0.0.2.
    let fins: Vec<&Row> = rows
        .iter()
        .filter(|r| [mover_a, mover_b].contains(&r.from()))
        .filter(|r| r.flags().is_some_and(|f| f & ControlFlags::FIN.bits() != 0))
        .collect();
    assert!(!fins.is_empty(), "the mover sent no FIN");
    assert!(
        fins.iter().all(|r| r.from() == mover_b),
        "the mover closed from its old locator: {fins:?}"
    );
    for r in rows.iter().filter(|r| r.frame() > rsyn_ack.frame()) {
        assert_ne!(
            r.to(),
            mover_a,
            "the instance still sent to the old locator: {r:?}"
        );
    }
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

/// The encrypted connect by name (`hs`) from `client`, which sent `SECRET` (echoed back):
/// every packet after the SYN protected, the stream payloads shown as encrypted bytes only
/// (no frame decoded from them), at least as many as were sent, and `SECRET` nowhere in the
/// capture file (`capture`).
fn check_encrypted(
    rows: &[Row],
    hs: &Handshake,
    client: SocketAddr,
    inst: SocketAddr,
    capture: &[u8],
) {
    let flow: Vec<&Row> = rows
        .iter()
        .filter(|r| (r.from(), r.to()) == (client, inst) || (r.from(), r.to()) == (inst, client))
        .collect();
    let mut encrypted = [0usize; 2];
    for r in &flow {
        r.assert_protected(hs.synack, false);
        assert!(
            !r.has("serval.frame.type") && !r.has("serval.payload"),
            "{r:?}"
        );
        if r.num("serval.protocol") == 1 {
            let n = r.one("serval.encrypted").len() / 2;
            encrypted[usize::from(r.from() == inst)] += n;
            // Header, packet number, the encrypted payload, the tag.
            if !r.has("serval.gso.segment") {
                assert_eq!(
                    r.num("udp.length"),
                    8 + r.num("serval.hdr_len") + 8 + n as u64 + 16,
                    "{r:?}"
                );
            }
        } else {
            assert!(!r.has("serval.encrypted"), "{r:?}");
        }
    }
    assert!(
        encrypted.iter().all(|n| *n >= SECRET.len()),
        "encrypted bytes each way: {encrypted:?}"
    );
    assert!(
        !capture.windows(SECRET.len()).any(|w| w == SECRET),
        "the encrypted session's bytes are in the capture in clear"
    );
    // The same search finds what the plaintext sessions sent.
    assert!(capture.windows(HELLO.len()).any(|w| w == HELLO));
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
        // A router holds no flow keys: the NACK is not protected.
        assert!(!nack.has("serval.pn") && !nack.has("serval.tag") && !nack.has("serval.auth_tag"));
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
    let secret = free_port("127.0.0.1");
    let ports: Vec<u16> = [router, inst, client, nacked, mover_a, mover_b, secret]
        .iter()
        .map(SocketAddr::port)
        .collect();
    let capture = Capture::start(&dir.0, &ports);

    let mut cmd = serval();
    cmd.args(["router", "--listen", &router.to_string()]);
    let (_router, ready, _router_log) = spawn_ready(cmd);
    assert_eq!(ready, router.to_string());

    // An echo instance of NAME, weight 3, registered with the router, that grants plaintext
    // to the clients that ask for it.
    let mut listen = serval()
        .args(["listen", NAME, "--bind", &inst.to_string(), "--echo"])
        .args([
            "--router",
            &router.to_string(),
            "--weight",
            "3",
            "--plaintext",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    let listen_log = lines(listen.stderr.take().unwrap());
    let mut listen = Guard(listen);
    wait_line(&listen_log, "registration", |l| l.contains("registered"));

    // A connect by name through the router, in plaintext.
    let mut cat = serval();
    cat.args(["cat", NAME, "--router", &router.to_string()])
        .args(["--bind", &client.to_string(), "--plaintext"]);
    let o = support::output_within(cat, HELLO, Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, HELLO);

    // The same, encrypted (as by default).
    let mut cat = serval();
    cat.args(["cat", NAME, "--router", &router.to_string()])
        .args(["--bind", &secret.to_string()])
        .env_remove("SERVAL_PLAINTEXT");
    let o = support::output_within(cat, SECRET, Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, SECRET);

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
    // The migrating client's request to move, and the instance's refusal (no agent), decoded.
    let asked: Vec<&Row> = rows.iter().filter(|r| r.has("serval.move.to")).collect();
    assert_eq!(
        asked.len(),
        2,
        "one MOVE_REQUEST and one MOVE_REFUSED: {asked:?}"
    );
    for r in &asked {
        assert_eq!(r.one("serval.move.to"), MOVE_TO, "{r:?}");
        assert_eq!(r.all("serval.frame.type").len(), 1, "{r:?}");
    }
    assert!(!asked[0].has("serval.move.refusal"), "{:?}", asked[0]);
    assert_eq!(asked[1].one("serval.move.refusal"), "1", "{:?}", asked[1]);
    for r in &rows {
        assert!(r.one("frame.protocols").ends_with(":serval"), "{r:?}");
        assert_eq!(r.one("serval.version"), "1", "{r:?}");
        assert!(!r.has("_ws.expert.message"), "{r:?}");
        // No flow lives long enough for a key update.
        assert!(!truthy(r.one("serval.key_phase")), "{r:?}");
        // Protected (a packet number and a tag) exactly when it is a flow's packet after the
        // SYN: a destination flowID, and not a router's NACK.
        let nack = r
            .flags()
            .is_some_and(|f| f & ControlFlags::NACK.bits() != 0);
        let protected = r.num("serval.dst_flowid") != 0 && !nack;
        assert_eq!(r.has("serval.tag"), protected, "{r:?}");
        assert_eq!(r.has("serval.pn"), protected, "{r:?}");
        assert!(!r.has("serval.auth_tag"), "{r:?}");
    }
    let batches = rows.iter().filter(|r| r.has("serval.gso.segment")).count();

    let echo_id = ServiceId::from_name(NAME).unwrap();
    check_registration(
        &rows,
        inst,
        router,
        &ServicePrefix::exact(echo_id).to_string(),
    );
    let hs = check_handshake(&rows, client, router, inst, &echo_id, true);
    check_echo(&rows, &hs, client, inst);
    let he = check_handshake(&rows, secret, router, inst, &echo_id, false);
    check_encrypted(&rows, &he, secret, inst, &std::fs::read(&file).unwrap());
    let hm = check_handshake(&rows, mover_a, router, inst, &echo_id, true);
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
    // `serval.flow.plaintext == 0`: the packets of the encrypted flow, and no other.
    let mut sealed: Vec<u64> = rows
        .iter()
        .filter(|r| [r.from(), r.to()].contains(&secret))
        .filter(|r| r.has("serval.tag"))
        .map(Row::frame)
        .collect();
    sealed.dedup();
    assert_eq!(filtered("serval.flow.plaintext == 0"), sealed);
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

/// Well-formed packets of every shape: handshake packets (with key shares), protected control
/// and data packets, a NACK, unprotected payloads, datagrams, registrations of every form, and
/// headers with PAD and unknown skippable extensions.
fn templates(rng: &mut Rng) -> Vec<Vec<u8>> {
    let id = ServiceId::from_name("web.example.com").unwrap();
    let flow = |rng: &mut Rng| FlowId(rng.next() | 1);
    let nonce = |rng: &mut Rng| {
        let mut n = [0u8; 16];
        n.copy_from_slice(&rng.bytes(16));
        Nonce(n)
    };
    let keyshare = |rng: &mut Rng| {
        let mut key = [0u8; 32];
        key.copy_from_slice(&rng.bytes(32));
        KeyShareRepr {
            group: KeyShareRepr::X25519,
            flags: rng.byte() & 1,
            key,
        }
    };
    // What protection appends to a header (docs/wire.md §12): a packet number, the payload
    // (encrypted or not), a tag.
    let sealed = |rng: &mut Rng, body: &[u8]| {
        let mut out = (rng.next() >> 40).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out.extend_from_slice(&rng.bytes(16));
        out
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
    syn.keyshare = Some(keyshare(rng));
    syn.source = vec![
        "192.0.2.1:40000".parse().unwrap(),
        "[2001:db8::7]:54324".parse().unwrap(),
        "198.51.100.9:54324".parse().unwrap(),
    ];
    out.push(syn.to_bytes(&[]).unwrap());
    // A server flooded with SYNs answers with a retry NACK holding a COOKIE, which the SYN
    // echoes; neither is protected.
    let mut token = [0u8; 20];
    token.copy_from_slice(&rng.bytes(20));
    syn.cookie = Some(token);
    out.push(syn.to_bytes(&[]).unwrap());
    let mut retry = SalRepr::new(Protocol::NONE, FlowId::NONE, syn.src_flow);
    retry.control = Some(ControlRepr {
        flags: ControlFlags::NACK,
        verno: 0,
        ackno: rng.next() as u32,
    });
    retry.nonce = syn.nonce;
    retry.cookie = Some(token);
    out.push(retry.to_bytes(&[]).unwrap());

    let mut synack = SalRepr::new(Protocol::NONE, flow(rng), flow(rng));
    synack.control = Some(ControlRepr {
        flags: ControlFlags::SYN | ControlFlags::ACK,
        verno: rng.next() as u32,
        ackno: rng.next() as u32,
    });
    synack.nonce = Some(nonce(rng));
    synack.keyshare = Some(keyshare(rng));
    let trailer = sealed(rng, &[]);
    out.push(synack.to_bytes(&trailer).unwrap());
    // Payloads of that flow, both ways: in clear if the SYN-ACK granted plaintext.
    let body = rng.bytes(12);
    let trailer = sealed(rng, &body);
    out.push(
        SalRepr::new(Protocol(9), synack.dst_flow, synack.src_flow)
            .to_bytes(&trailer)
            .unwrap(),
    );
    out.push(
        SalRepr::new(Protocol::NONE, synack.src_flow, synack.dst_flow)
            .to_bytes(&trailer)
            .unwrap(),
    );
    // The same SYN-ACK in the form before packet protection (an AUTH tag, nothing after the
    // header): too short for a packet number and a tag.
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&rng.bytes(16));
    synack.keyshare = None;
    synack.auth = Some(tag);
    out.push(synack.to_bytes(&[]).unwrap());

    for flags in [
        ControlFlags::RSYN,
        ControlFlags::RST,
        ControlFlags::FIN | ControlFlags::ACK,
    ] {
        let mut c = SalRepr::new(Protocol::NONE, flow(rng), flow(rng));
        c.control = Some(ControlRepr {
            flags,
            verno: rng.next() as u32,
            ackno: rng.next() as u32,
        });
        let trailer = sealed(rng, &[]);
        out.push(c.to_bytes(&trailer).unwrap());
        // AUTH is no longer sent, but still parsed.
        c.auth = Some(tag);
        out.push(c.to_bytes(&trailer).unwrap());
    }

    // A router's NACK: no flow keys, so no protection.
    let mut nack = SalRepr::new(Protocol::NONE, FlowId::NONE, flow(rng));
    nack.control = Some(ControlRepr {
        flags: ControlFlags::NACK,
        verno: 0,
        ackno: rng.next() as u32,
    });
    nack.nonce = Some(nonce(rng));
    out.push(nack.to_bytes(&[]).unwrap());

    // Protected payloads: a stream packet, protocol 0 and an unassigned protocol.
    for protocol in [Protocol::STREAM, Protocol::NONE, Protocol(9)] {
        let n = 1 + rng.below(40);
        let body = rng.bytes(n);
        let payload = sealed(rng, &body);
        out.push(
            SalRepr::new(protocol, flow(rng), flow(rng))
                .to_bytes(&payload)
                .unwrap(),
        );
    }
    // Unprotected opaque payloads (no destination flowID), shown as they are.
    let payload = rng.bytes(24);
    for protocol in [Protocol::NONE, Protocol(9)] {
        out.push(
            SalRepr::new(protocol, flow(rng), FlowId::NONE)
                .to_bytes(&payload)
                .unwrap(),
        );
    }

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
    // The cookie form (a request without a cookie yet, the router's COOKIE, the request with
    // it) and the signed form (a request, a REJECT with its zeroed signature).
    let mut cookie = [0u8; 16];
    cookie.copy_from_slice(&rng.bytes(16));
    let first = register.with_cookie(Cookie::EMPTY);
    out.push(first.to_packet().to_vec());
    out.push(first.cookie_answer(Cookie(cookie)).to_packet().to_vec());
    let second = register.with_cookie(Cookie(cookie));
    out.push(second.to_packet().to_vec());
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&rng.bytes(64));
    let signed = RegistrationRepr {
        signature: Some(Signature(signature)),
        ..second
    };
    out.push(signed.to_packet().to_vec());
    out.push(
        signed
            .reject(RejectReason::UNAUTHORIZED)
            .to_packet()
            .to_vec(),
    );

    // PAD and an unknown extension without the must-understand bit, spliced in by hand.
    let trailer = sealed(rng, &payload);
    let mut base = SalRepr::new(Protocol::NONE, flow(rng), flow(rng))
        .to_bytes(&trailer)
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
    const INTERESTING: [u8; 19] = [
        0, 1, 2, 3, 4, 6, 7, 12, 18, 22, 36, 0x10, 0x20, 0x81, 0x84, 0x85, 0x86, 0x88, 0xff,
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
/// 1 defines, and for a registration a payload of 60, 76 or 140 bytes with zero flowIDs.
fn heuristic_claims(p: &[u8]) -> bool {
    let Ok(pkt) = SalPacket::new_checked(p) else {
        return false;
    };
    match pkt.protocol() {
        Protocol::REGISTRATION => {
            [60, 76, 140].contains(&pkt.payload().len())
                && pkt.src_flow().is_none()
                && pkt.dst_flow().is_none()
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
            "serval.key_phase",
            "serval.keyshare.group",
            "serval.keyshare.flags",
            "serval.keyshare.plaintext",
            "serval.keyshare.key",
            "serval.cookie",
            "serval.protection.malformed",
            "serval.pn",
            "serval.pn.space",
            "serval.flow.plaintext",
            "serval.encrypted",
            "serval.tag",
            "serval.reg.type",
            "serval.reg.reason",
            "serval.reg.prefix",
            "serval.reg.request_id",
            "serval.reg.instance",
            "serval.reg.weight",
            "serval.reg.priority",
            "serval.reg.ttl",
            "serval.reg.cookie",
            "serval.reg.signature",
            "serval.dgram.service_id",
            "serval.dgram.data",
            "serval.payload",
        ],
    );
    assert_eq!(rows.len(), frames.len());

    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let (mut valid, mut claimed) = (0, 0);
    // What the SYN-ACKs the dissector has seen so far said, per direction of a flow: plaintext
    // or not (the dissector's per-flow state, as docs/wire.md §4.6 and §12 define it).
    let mut modes: HashMap<(u64, u64), bool> = HashMap::new();
    let mut protected_seen = [0usize; 3];
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
                assert_eq!(row.num("serval.flags") & 0x7f, u64::from(c.flags.bits()));
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
        assert_eq!(truthy(row.one("serval.key_phase")), pkt.key_phase());
        match repr.keyshare {
            Some(k) => {
                assert_eq!(row.num("serval.keyshare.group"), u64::from(k.group));
                assert_eq!(row.num("serval.keyshare.flags"), u64::from(k.flags));
                assert_eq!(
                    truthy(row.one("serval.keyshare.plaintext")),
                    k.flags & KeyShareRepr::PLAINTEXT != 0
                );
                assert_eq!(row.one("serval.keyshare.key"), hex(&k.key), "{}", ctx());
            }
            None => assert!(!row.has("serval.keyshare.key"), "{}", ctx()),
        }
        assert_eq!(
            row.get("serval.cookie").map(str::to_owned),
            repr.cookie.map(|c| hex(&c))
        );
        let locators: Vec<String> = repr.source.iter().map(ToString::to_string).collect();
        assert_eq!(row.all("serval.source.locator"), locators, "{}", ctx());
        let mut payload = pkt.payload();
        let flows = (repr.src_flow.0, repr.dst_flow.0);
        if let (Some(c), Some(k)) = (repr.control, repr.keyshare)
            && c.flags.contains(ControlFlags::SYN | ControlFlags::ACK)
        {
            let plaintext = k.flags & KeyShareRepr::PLAINTEXT != 0;
            modes.insert(flows, plaintext);
            modes.insert((flows.1, flows.0), plaintext);
        }
        // Protected: a flow's packet after the SYN (a destination flowID), but not a NACK.
        let protected = !repr.dst_flow.is_none()
            && !repr
                .control
                .is_some_and(|c| c.flags.contains(ControlFlags::NACK));
        let plaintext = !protected || modes.get(&flows) == Some(&true);
        if !protected {
            assert!(!row.has("serval.tag") && !row.has("serval.flow.plaintext"));
            if repr.protocol != Protocol::STREAM {
                assert!(!row.has("serval.pn"), "{}", ctx());
            }
        } else if payload.len() < 24 {
            // Too short for a packet number and a tag: the receiver drops it.
            assert!(row.has("serval.protection.malformed"), "{}", ctx());
            assert!(says("TooShort"), "{}", ctx());
            assert!(!row.has("serval.pn") && !row.has("serval.tag"), "{}", ctx());
            protected_seen[0] += 1;
        } else {
            assert!(!row.has("serval.protection.malformed"), "{}", ctx());
            let (pn, rest) = payload.split_at(8);
            let (body, tag) = rest.split_at(rest.len() - 16);
            assert_eq!(
                row.num("serval.pn"),
                u64::from_be_bytes(pn.try_into().unwrap()),
                "{}",
                ctx()
            );
            let space = if repr.control.is_some() {
                "control"
            } else {
                "data"
            };
            assert_eq!(row.one("serval.pn.space"), space);
            assert_eq!(row.one("serval.tag"), hex(tag), "{}", ctx());
            assert_eq!(truthy(row.one("serval.flow.plaintext")), plaintext);
            if plaintext {
                assert!(!row.has("serval.encrypted"), "{}", ctx());
                protected_seen[1] += 1;
            } else {
                assert_eq!(
                    row.get("serval.encrypted"),
                    (!body.is_empty()).then(|| hex(body)).as_deref(),
                    "{}",
                    ctx()
                );
                assert!(!row.has("serval.payload"), "{}", ctx());
                protected_seen[2] += 1;
            }
            // In clear: what follows is the body, read as its protocol says.
            payload = body;
        }
        if !plaintext {
            continue;
        }
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
                        assert_eq!(
                            row.get("serval.reg.cookie").map(str::to_owned),
                            r.cookie.map(|c| hex(&c.0))
                        );
                        assert_eq!(
                            row.get("serval.reg.signature").map(str::to_owned),
                            r.signature.map(|s| hex(&s.0))
                        );
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
        "wireshark: {} packets ({valid} valid, {claimed} claimed by the heuristic; protected: \
         {protected_seen:?} too short, plaintext, encrypted); errors named as serval-wire names \
         them: {errors:?}",
        corpus.len()
    );
    // The corpus is worth something only if it reaches the rules: most of them, both ways.
    assert!(valid > 200, "only {valid} valid packets");
    // Protected packets too short, in plaintext flows and in encrypted ones.
    assert!(
        protected_seen.iter().all(|n| *n > 0),
        "protected packets (too short, plaintext, encrypted): {protected_seen:?}"
    );
    assert!(claimed > 100, "the heuristic claimed only {claimed}");
    assert!(
        errors.len() >= 20,
        "only these errors were reached: {errors:?}"
    );
}

/// A STREAM frame (one-byte varints: `offset` and the length below 64).
fn stream_frame(offset: u8, data: &[u8], fin: bool) -> Vec<u8> {
    let mut f = vec![if fin { 0x09 } else { 0x08 }, offset];
    f.push(u8::try_from(data.len()).unwrap());
    f.extend_from_slice(data);
    f
}

/// The tag the test packets carry: 16 bytes that name their packet number.
fn test_tag(pn: u64) -> [u8; 16] {
    [0xa0 | (pn as u8 & 0x0f); 16]
}

/// A protected stream packet of `flows`: packet number `pn`, `frames`, PADDING up to `pad_to`
/// bytes in all, and the tag.
fn stream_packet(flows: (u64, u64), pn: u64, frames: &[u8], pad_to: usize) -> Vec<u8> {
    let mut payload = pn.to_be_bytes().to_vec();
    payload.extend_from_slice(frames);
    let len = 20 + payload.len() + 16;
    payload.resize(payload.len() + pad_to.saturating_sub(len), 0);
    payload.extend_from_slice(&test_tag(pn));
    SalRepr::new(Protocol::STREAM, FlowId(flows.0), FlowId(flows.1))
        .to_bytes(&payload)
        .unwrap()
}

/// A protected control packet of `flows` (packet number `pn` in the control space).
fn control_packet(
    flows: (u64, u64),
    pn: u64,
    flags: ControlFlags,
    keyshare: Option<KeyShareRepr>,
) -> Vec<u8> {
    let mut c = SalRepr::new(Protocol::NONE, FlowId(flows.0), FlowId(flows.1));
    c.control = Some(ControlRepr {
        flags,
        verno: 77,
        ackno: 1234,
    });
    c.keyshare = keyshare;
    let mut trailer = pn.to_be_bytes().to_vec();
    trailer.extend_from_slice(&test_tag(pn));
    c.to_bytes(&trailer).unwrap()
}

#[test]
fn tshark_splits_a_gso_batch_into_its_packets() {
    if !tools_present("tshark_splits_a_gso_batch_into_its_packets", &["tshark"]) {
        return;
    }
    let dir = TempDir::new("gso");
    const UP: (u64, u64) = (7, 9);
    // A packet of the flow before its SYN-ACK is in the capture: its mode is not known yet,
    // so its payload shows as encrypted.
    let early = stream_packet(UP, 39, &stream_frame(0, b"early", false), 0);
    // The SYN-ACK (9 → 7) grants plaintext: from here on, both directions are readable.
    let synack = control_packet(
        (9, 7),
        0,
        ControlFlags::SYN | ControlFlags::ACK,
        Some(KeyShareRepr {
            group: KeyShareRepr::X25519,
            flags: KeyShareRepr::PLAINTEXT,
            key: [0x55; 32],
        }),
    );
    // What a capture on the sending host holds for one sendmsg with UDP_SEGMENT = 120: three
    // packets of one flow back to back, the last shorter. A PADDING run, then the tag, ends
    // each full one.
    let mut batch = stream_packet(UP, 40, &stream_frame(0, b"first", false), 120);
    batch.extend(stream_packet(
        UP,
        41,
        &stream_frame(5, b"second", false),
        120,
    ));
    batch.extend(stream_packet(UP, 42, &stream_frame(11, b"end", true), 0));
    // Not a batch: a packet whose payload quotes another flow's header.
    let other = SalRepr::new(Protocol::STREAM, FlowId(8), FlowId(9))
        .to_bytes(&[0; 8])
        .unwrap();
    let mut frames = stream_frame(0, b"x", false);
    frames.extend(stream_frame(0, &other, false));
    let quoting = stream_packet(UP, 43, &frames, 0);
    // A control packet and a stream packet of one flow in one batch, as a client sends its
    // handshake ACK and first bytes: segment size 56 (the control packet: 32 bytes of header,
    // packet number, tag), the last shorter (52 bytes).
    let mut mixed = control_packet(UP, 0, ControlFlags::ACK, None);
    assert_eq!(mixed.len(), 56);
    mixed.extend(stream_packet(UP, 44, &stream_frame(0, b"mixed", false), 0));
    assert_eq!(mixed.len(), 56 + 52);
    // A batch of a flow whose SYN-ACK the capture does not hold: split all the same, its
    // payloads (here readable bytes, for all the dissector knows encrypted) shown as such.
    let mut unknown = stream_packet((5, 6), 1, &stream_frame(0, b"unknown", false), 64);
    unknown.extend(stream_packet(
        (5, 6),
        2,
        &stream_frame(7, b"flow", false),
        0,
    ));
    // An encrypted flow: its SYN-ACK does not grant plaintext.
    let encrypted_synack = control_packet(
        (11, 10),
        0,
        ControlFlags::SYN | ControlFlags::ACK,
        Some(KeyShareRepr {
            group: KeyShareRepr::X25519,
            flags: 0,
            key: [0x66; 32],
        }),
    );
    let sealed = stream_packet((10, 11), 0, &stream_frame(0, b"sealed", false), 0);
    let file = dir.0.join("gso.pcap");
    write_pcap(
        &file,
        &[
            (40_002, early),
            (40_002, synack),
            (40_002, batch),
            (40_002, quoting),
            (40_002, mixed),
            (40_002, unknown),
            (40_002, encrypted_synack),
            (40_002, sealed),
        ],
    );
    let fields = [
        "serval.gso.segment",
        "serval.gso.segments",
        "serval.gso.segment_size",
        "serval.src_flowid",
        "serval.pn",
        "serval.pn.space",
        "serval.flow.plaintext",
        "serval.flow.synack",
        "serval.stream.offset",
        "serval.stream.fin",
        "serval.stream.data",
        "serval.encrypted",
        "serval.tag",
        "serval.protocol",
        "serval.flags",
        "serval.ackno",
        "_ws.expert.message",
    ];
    let rows = tshark(&file, &[], &fields);
    // A second pass (as Wireshark redissects, the packets already seen) decides as the first.
    let two_pass = tshark(&file, &["-2"], &fields);
    assert_eq!(
        rows.iter().map(|r| &r.f).collect::<Vec<_>>(),
        two_pass.iter().map(|r| &r.f).collect::<Vec<_>>(),
        "two passes decode differently"
    );
    assert_eq!(rows.len(), 8);
    let tags = |pns: &[u64]| -> Vec<String> { pns.iter().map(|p| hex(&test_tag(*p))).collect() };
    let e = &rows[0];
    assert_eq!(e.all("serval.pn"), ["39"]);
    assert!(!truthy(e.one("serval.flow.plaintext")), "{e:?}");
    assert!(!e.has("serval.flow.synack") && !e.has("serval.stream.offset"));
    assert_eq!(
        e.all("serval.encrypted"),
        [hex(&stream_frame(0, b"early", false))]
    );
    assert_eq!(e.all("serval.tag"), tags(&[39]));
    let s = &rows[1];
    assert_eq!(s.all("serval.pn.space"), ["control"]);
    assert!(truthy(s.one("serval.flow.plaintext")));
    assert_eq!(s.all("serval.flow.synack"), ["2"]);
    assert_eq!(s.all("serval.tag"), tags(&[0]));
    let b = &rows[2];
    assert_eq!(b.all("serval.gso.segment"), ["1", "2", "3"]);
    assert_eq!(b.all("serval.gso.segments"), ["3", "3", "3"]);
    assert_eq!(b.all("serval.gso.segment_size"), ["120", "120", "120"]);
    assert_eq!(b.all("serval.src_flowid"), ["0x0000000000000007"; 3]);
    assert_eq!(b.all("serval.pn"), ["40", "41", "42"]);
    assert_eq!(b.all("serval.pn.space"), ["data"; 3]);
    assert_eq!(b.all("serval.flow.synack"), ["2"; 3]);
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
    assert_eq!(b.all("serval.tag"), tags(&[40, 41, 42]));
    assert!(!b.has("serval.encrypted"), "{b:?}");
    assert!(!b.has("_ws.expert.message"), "{b:?}");
    let q = &rows[3];
    assert!(!q.has("serval.gso.segment"), "{q:?}");
    assert_eq!(q.all("serval.pn"), ["43"]);
    assert_eq!(q.all("serval.stream.data"), [hex(b"x"), hex(&other)]);
    assert_eq!(q.all("serval.tag"), tags(&[43]));
    assert!(!q.has("_ws.expert.message"), "{q:?}");
    let m = &rows[4];
    assert_eq!(m.all("serval.gso.segment"), ["1", "2"]);
    assert_eq!(m.all("serval.gso.segment_size"), ["56", "56"]);
    assert_eq!(m.all("serval.protocol"), ["0", "1"]);
    assert_eq!(m.all("serval.flags"), ["0x0002"]);
    assert_eq!(m.all("serval.ackno"), ["1234"]);
    assert_eq!(m.all("serval.pn"), ["0", "44"]);
    assert_eq!(m.all("serval.pn.space"), ["control", "data"]);
    assert_eq!(m.all("serval.stream.data"), [hex(b"mixed")]);
    assert_eq!(m.all("serval.tag"), tags(&[0, 44]));
    assert!(!m.has("_ws.expert.message"), "{m:?}");
    let u = &rows[5];
    assert_eq!(u.all("serval.gso.segment"), ["1", "2"]);
    assert_eq!(u.all("serval.gso.segment_size"), ["64", "64"]);
    assert_eq!(u.all("serval.pn"), ["1", "2"]);
    assert!(!u.has("serval.stream.offset") && !u.has("serval.flow.synack"));
    let mut first = stream_frame(0, b"unknown", false);
    first.resize(64 - 20 - 8 - 16, 0);
    assert_eq!(
        u.all("serval.encrypted"),
        [hex(&first), hex(&stream_frame(7, b"flow", false))]
    );
    assert_eq!(u.all("serval.tag"), tags(&[1, 2]));
    assert!(!u.has("_ws.expert.message"), "{u:?}");
    let x = &rows[7];
    assert!(!truthy(x.one("serval.flow.plaintext")));
    assert_eq!(x.all("serval.flow.synack"), ["7"]);
    assert_eq!(
        x.all("serval.encrypted"),
        [hex(&stream_frame(0, b"sealed", false))]
    );

    // With the preference for flows whose SYN-ACK is not captured, their frames are decoded;
    // a flow whose SYN-ACK is captured still follows it.
    let assumed = tshark(&file, &["-o", "serval.assume_plaintext:TRUE"], &fields);
    assert_eq!(assumed[0].all("serval.stream.data"), [hex(b"early")]);
    assert!(truthy(assumed[0].one("serval.flow.plaintext")));
    assert_eq!(assumed[5].all("serval.stream.offset"), ["0", "7"]);
    assert_eq!(
        assumed[5].all("serval.stream.data"),
        [hex(b"unknown"), hex(b"flow")]
    );
    assert!(!assumed[5].has("serval.encrypted"));
    for i in [1, 2, 3, 4, 6, 7] {
        assert_eq!(assumed[i].f, rows[i].f, "frame {}", i + 1);
    }
}
