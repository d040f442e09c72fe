//! Streams that move between instances on loopback (issue 10): a stateful service (it numbers
//! the lines of each connection) moved back and forth by its migration agents mid-transfer,
//! the client checking every line and its number; a move refused by the other instance, or
//! to an agent that does not hold the key, leaves the stream running where it was.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::sync::Arc;
use std::time::Duration;

use serval::{
    Endpoint, FlowId, Locator, MigrationConfig, Migrator, PathEvent, PrivateKey, ServiceId,
    ServicePrefix, Stream,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use tokio::time::timeout;

const NAME: &str = "count.moves.test";

fn key() -> PrivateKey {
    PrivateKey::generate(&ring::rand::SystemRandom::new()).unwrap()
}

/// The per-connection state: the next line's number and a partial line.
#[derive(Default)]
struct Numbering {
    next: u64,
    partial: Vec<u8>,
}

impl Numbering {
    fn encode(&self) -> Vec<u8> {
        let mut out = self.next.to_be_bytes().to_vec();
        out.extend_from_slice(&self.partial);
        out
    }

    fn decode(b: &[u8]) -> Numbering {
        Numbering {
            next: u64::from_be_bytes(b[..8].try_into().unwrap()),
            partial: b[8..].to_vec(),
        }
    }
}

/// Answers each line with `N line`, N counting from 0 over the connection's whole life, and
/// hands the stream over when its agent asks.
async fn serve(mut stream: Stream) {
    let mut st = stream
        .take_app_state()
        .map_or_else(Numbering::default, |b| Numbering::decode(&b));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut io = &stream;
        let read = tokio::select! {
            () = stream.move_requested() => None,
            r = io.read(&mut buf) => Some(r),
        };
        let n = match read {
            None if stream.is_move_requested() => match stream.hand_over(&st.encode()).await {
                Ok(()) => return,
                Err(f) => match f.stream {
                    Some(s) => {
                        stream = s;
                        continue;
                    }
                    None => return,
                },
            },
            // Closed: what is left to read, if anything.
            None => match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            Some(Ok(0) | Err(_)) => {
                let _ = io.shutdown().await;
                let _ = timeout(Duration::from_secs(5), stream.closed()).await;
                return;
            }
            Some(Ok(n)) => n,
        };
        let mut out = Vec::new();
        for &b in &buf[..n] {
            st.partial.push(b);
            if b == b'\n' {
                out.extend_from_slice(format!("{} ", st.next).as_bytes());
                out.extend_from_slice(&st.partial);
                st.partial.clear();
                st.next += 1;
            }
        }
        if io.write_all(&out).await.is_err() {
            return;
        }
    }
}

struct Instance {
    ep: Endpoint,
    agent: Migrator,
}

async fn instance(key: &PrivateKey) -> Instance {
    let ep = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let agent = agent(&ep, key, "127.0.0.1:0".parse().unwrap()).await;
    Instance { ep, agent }
}

/// Serves the numbering service on `ep` and starts its migration agent at `bind`.
async fn agent(ep: &Endpoint, key: &PrivateKey, bind: Locator) -> Migrator {
    let mut listener = ep.listen(ServicePrefix::parse(NAME).unwrap()).unwrap();
    tokio::spawn(async move {
        while let Ok(s) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    Migrator::start(
        ep,
        MigrationConfig {
            key: key.clone(),
            allowed: Vec::new(),
            bind,
            refuse_moves_in: None,
        },
    )
    .await
    .unwrap()
}

/// Writes `lines` lines while reading their numbered answers; returns when all came back.
/// The second half is written only once `rest` has a permit, so a test can keep the stream
/// alive for as long as it needs.
async fn client_run(
    stream: Arc<Stream>,
    lines: u64,
    progress: tokio::sync::watch::Sender<u64>,
    rest: Arc<Semaphore>,
) {
    let writing = stream.clone();
    let writer = tokio::spawn(async move {
        let mut w = &*writing;
        for i in 0..lines {
            if i == lines / 2 {
                let _ = rest.acquire().await.unwrap();
            }
            w.write_all(format!("line {i} {}\n", "x".repeat((i % 97) as usize)).as_bytes())
                .await
                .unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut r = BufReader::new(&*stream);
    let mut line = String::new();
    for i in 0..lines {
        line.clear();
        let n = r.read_line(&mut line).await.unwrap();
        assert!(n > 0, "stream ended at line {i}");
        let want = format!("{i} line {i} {}\n", "x".repeat((i % 97) as usize));
        assert_eq!(line, want, "line {i}");
        let _ = progress.send(i);
    }
    line.clear();
    assert_eq!(
        r.read_line(&mut line).await.unwrap(),
        0,
        "nothing after the last line"
    );
    writer.await.unwrap();
}

/// A client of `a` running `client_run` with `lines` lines, once 1000 came back; it writes
/// its second half once `rest` has a permit.
async fn started_client(
    a: &Instance,
    lines: u64,
    rest: &Arc<Semaphore>,
) -> tokio::task::JoinHandle<()> {
    started_client_stream(a, lines, rest).await.0
}

/// [`started_client`], with the client's stream.
async fn started_client_stream(
    a: &Instance,
    lines: u64,
    rest: &Arc<Semaphore>,
) -> (tokio::task::JoinHandle<()>, Arc<Stream>) {
    let client = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let stream = client
        .connect_via(
            ServiceId::from_name(NAME).unwrap(),
            a.ep.local_locators()[0],
        )
        .await
        .unwrap();
    let stream = Arc::new(stream);
    let (tx, mut progress) = tokio::sync::watch::channel(0);
    let run = tokio::spawn(client_run(stream.clone(), lines, tx, rest.clone()));
    progress.wait_for(|p| *p >= 1000).await.unwrap();
    (run, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_stream_moves_back_and_forth_mid_transfer_and_the_numbering_continues() {
    timeout(Duration::from_secs(120), async {
        let k = key();
        let a = instance(&k).await;
        let b = instance(&k).await;
        let client = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
            .await
            .unwrap();
        let stream = client
            .connect_via(
                ServiceId::from_name(NAME).unwrap(),
                a.ep.local_locators()[0],
            )
            .await
            .unwrap();
        let (tx, mut progress) = tokio::sync::watch::channel(0);
        let lines = 200_000;
        let run = tokio::spawn(client_run(
            Arc::new(stream),
            lines,
            tx,
            Arc::new(Semaphore::new(1)),
        ));
        let hosts = [&a, &b];
        let mut moves = 0;
        for i in 0..6u64 {
            // Wait for progress so each move happens mid-transfer.
            let target = (i + 1) * lines / 8;
            timeout(Duration::from_secs(30), progress.wait_for(|p| *p >= target))
                .await
                .expect("progress")
                .unwrap();
            let (from, to) = (hosts[(i % 2) as usize], hosts[((i + 1) % 2) as usize]);
            let report = from
                .agent
                .move_flows(&[], to.agent.locator(), to.agent.public_key())
                .await
                .unwrap();
            assert_eq!(report.len(), 1, "one flow to move: {report:?}");
            let phases = report[0].result.as_ref().expect("moved");
            assert!(phases.frozen >= phases.export);
            moves += 1;
            assert!(
                from.agent.movable_flows().is_empty(),
                "released at the old host"
            );
            let at_new = to.ep.flows();
            assert_eq!(at_new.len(), 1);
            assert_eq!(at_new[0].moves, moves);
        }
        run.await.unwrap();
    })
    .await
    .expect("bounded");
}

/// A stream with two paths moves too: the hand-over removes the second path first (the
/// client is told by a JOIN|FIN and acknowledges it), since a snapshot carries one path. At
/// the new host the stream runs on one path, and the numbering goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_two_paths_moves_on_one() {
    timeout(Duration::from_secs(90), async {
        let k = key();
        let a = instance(&k).await;
        let b = instance(&k).await;
        let client = Endpoint::bind(&[
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
        ])
        .await
        .unwrap();
        let server_loc = a.ep.local_locators()[0];
        let stream = client
            .connect_via(ServiceId::from_name(NAME).unwrap(), server_loc)
            .await
            .unwrap();
        let mut events = client.path_events();
        let id = stream
            .add_path(client.local_locators()[1], server_loc, false)
            .unwrap();
        loop {
            match timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("the second path comes up")
                .unwrap()
            {
                PathEvent::PathUp { stream: s, path } if s == stream.id() && path == id => break,
                PathEvent::PathDown { stream: s, .. } if s == stream.id() => {
                    panic!("the join failed")
                }
                _ => {}
            }
        }
        let stream = Arc::new(stream);
        let (tx, mut progress) = tokio::sync::watch::channel(0);
        let lines = 100_000;
        let run = tokio::spawn(client_run(
            stream.clone(),
            lines,
            tx,
            Arc::new(Semaphore::new(1)),
        ));
        timeout(
            Duration::from_secs(30),
            progress.wait_for(|p| *p >= lines / 4),
        )
        .await
        .expect("progress")
        .unwrap();
        assert_eq!(stream.paths().len(), 2, "two paths before the move");
        let report = a
            .agent
            .move_flows(&[], b.agent.locator(), b.agent.public_key())
            .await
            .unwrap();
        assert_eq!(report.len(), 1, "one flow to move: {report:?}");
        report[0].result.as_ref().expect("moved");
        let at_new = b.ep.flows();
        assert_eq!(at_new.len(), 1);
        assert_eq!(at_new[0].moves, 1);
        // The client heard of the removal: its stream runs on path 0 alone, now to B.
        let paths = stream.paths();
        assert_eq!(paths.len(), 1, "{paths:?}");
        run.await.unwrap();
        assert_eq!(
            stream.peer_locator().unwrap(),
            b.ep.local_locators()[0],
            "the stream ended at the new host"
        );
    })
    .await
    .expect("bounded");
}

/// The client asks for the move (docs/protocol.md §4.5): its stream moves from A to B and
/// back, each time to the instance it named, with the numbering going on; a request naming
/// an agent that does not hold the service's key, or a client's request while its server
/// runs no agent, leaves the stream where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asks_for_its_stream_to_move_and_only_to_an_instance_of_the_service() {
    timeout(Duration::from_secs(90), async {
        let k = key();
        let a = instance(&k).await;
        let b = instance(&k).await;
        let stranger = instance(&key()).await;
        let rest = Arc::new(Semaphore::new(0));
        let (run, stream) = started_client_stream(&a, 400_000, &rest).await;
        let at_a = stream.peer_locator().unwrap();
        assert_eq!(at_a, a.ep.local_locators()[0]);

        // A host outside the service: A's agent cannot connect to it (it proves another
        // key), the stream stays at A, and the client is told why.
        let e = timeout(
            Duration::from_secs(10),
            stream.request_move(stranger.agent.locator()),
        )
        .await
        .expect("an answer, not a timeout")
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("no instance of the service"), "{e}");
        assert_eq!(stream.peer_locator().unwrap(), at_a);
        assert_eq!(a.agent.movable_flows().len(), 1, "still served at A");
        assert!(stranger.ep.flows().is_empty());
        assert_eq!(a.agent.client_moves(), (0, 1));
        // Asked again at once: refused for the same reason without a new attempt.
        let again = stream.request_move(stranger.agent.locator()).await;
        assert_eq!(
            again.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        assert_eq!(a.agent.client_moves(), (0, 1));

        // To B, then back to A (after the failed request's back-off), with the second half
        // of the lines flowing both ways.
        tokio::time::sleep(serval::ASKED_MOVE_BACKOFF).await;
        rest.add_permits(1);
        let moved = stream.request_move(b.agent.locator()).await.unwrap();
        assert_eq!(moved, b.ep.local_locators()[0]);
        assert_eq!(stream.peer_locator().unwrap(), moved);
        assert!(a.agent.movable_flows().is_empty(), "released at A");
        assert_eq!(b.ep.flows()[0].moves, 1);
        let back = stream.request_move(a.agent.locator()).await.unwrap();
        assert_eq!(back, at_a);
        assert_eq!(a.ep.flows().iter().filter(|f| f.moves == 2).count(), 1);
        assert!(
            !run.is_finished(),
            "both moves happened mid-transfer (make the transfer longer)"
        );
        run.await.unwrap();
        // Once closed, there is nothing to move.
        stream.closed().await;
        let e = stream.request_move(b.agent.locator()).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    })
    .await
    .expect("bounded");
}

/// A move uses the agent stream `prepare` opened; when the agent at the other end went away
/// meanwhile, the kept stream no longer answers: the move fails while nothing is at its
/// locator, and opens a new stream once an agent was restarted there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_agent_stream_whose_agent_restarted_is_replaced() {
    timeout(Duration::from_secs(60), async {
        let k = key();
        let a = instance(&k).await;
        let b = instance(&k).await;
        let at = b.agent.locator();
        a.agent.prepare(at, k.public_key()).await.unwrap();
        let rest = Arc::new(Semaphore::new(0));
        let run = started_client(&a, 60_000, &rest).await;
        drop(b.agent);
        // Gone with its agent: the stream it kept for A no longer answers, and nobody is at
        // its locator any more. The move fails and the stream stays at A.
        let gone = a.agent.move_flows(&[], at, k.public_key()).await;
        assert!(gone.is_err(), "moved to a stopped agent: {gone:?}");
        assert_eq!(a.agent.movable_flows().len(), 1, "still served at A");
        assert!(b.ep.flows().is_empty());
        // The agent's port is free again once its endpoint closed.
        let restarted = async {
            loop {
                match Migrator::start(
                    &b.ep,
                    MigrationConfig {
                        key: k.clone(),
                        allowed: Vec::new(),
                        bind: at,
                        refuse_moves_in: None,
                    },
                )
                .await
                {
                    Ok(m) => return m,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        let _restarted = timeout(Duration::from_secs(10), restarted).await.unwrap();
        let r = a.agent.move_flows(&[], at, k.public_key()).await.unwrap();
        assert_eq!(r.len(), 1);
        r[0].result.as_ref().expect("moved over a new agent stream");
        assert_eq!(b.ep.flows().len(), 1, "served at B");
        rest.add_permits(1);
        run.await.unwrap();
    })
    .await
    .expect("bounded");
}

/// A server with no migration agent refuses a client's request at once, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_an_agent_refuses_a_clients_move_request() {
    timeout(Duration::from_secs(30), async {
        let any: Locator = "127.0.0.1:0".parse().unwrap();
        let server = Endpoint::bind(&[any]).await.unwrap();
        let mut listener = server.listen(ServicePrefix::parse(NAME).unwrap()).unwrap();
        tokio::spawn(async move {
            while let Ok(s) = listener.accept().await {
                tokio::spawn(serve(s));
            }
        });
        let client = Endpoint::bind(&[any]).await.unwrap();
        let stream = client
            .connect_via(
                ServiceId::from_name(NAME).unwrap(),
                server.local_locators()[0],
            )
            .await
            .unwrap();
        let e = stream
            .request_move("127.0.0.1:9".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("no migration agent"), "{e}");
        // The stream is as it was.
        let mut io = &stream;
        io.write_all(b"still here\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).await.unwrap();
        assert_eq!(line, "0 still here\n");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_unauthorised_move_leaves_the_stream_where_it_was() {
    timeout(Duration::from_secs(60), async {
        let k = key();
        let a = instance(&k).await;
        // Holds another key: A's agent refuses to hand it anything (B proves a key A was not
        // told of), and B refuses what A's key signs.
        let stranger = instance(&key()).await;
        // Serves nothing: refuses the import.
        let any: Locator = "127.0.0.1:0".parse().unwrap();
        let idle_ep = Endpoint::bind(&[any]).await.unwrap();
        let idle = Migrator::start(
            &idle_ep,
            MigrationConfig {
                key: k.clone(),
                allowed: Vec::new(),
                bind: any,
                refuse_moves_in: None,
            },
        )
        .await
        .unwrap();

        let rest = Arc::new(Semaphore::new(0));
        let run = started_client(&a, 60_000, &rest).await;

        // The stranger proves its own key, not the one A expects: the connect fails.
        let e = a
            .agent
            .move_flows(&[], stranger.agent.locator(), k.public_key())
            .await
            .unwrap_err();
        assert!(!e.to_string().is_empty());
        // Told the stranger's real key, A connects, but the stranger refuses A's key.
        let r = a
            .agent
            .move_flows(&[], stranger.agent.locator(), stranger.agent.public_key())
            .await;
        let e = r.unwrap_err();
        assert!(e.to_string().contains("refused this instance's key"), "{e}");
        // The idle instance serves nothing: refused, thawed at A.
        let r = a
            .agent
            .move_flows(&[], idle.locator(), idle.public_key())
            .await
            .unwrap();
        assert_eq!(r.len(), 1);
        let e = r[0].result.as_ref().unwrap_err();
        assert!(e.contains("refused"), "{e}");
        // An unknown flow.
        let r = a
            .agent
            .move_flows(&[FlowId(12345)], idle.locator(), idle.public_key())
            .await
            .unwrap();
        assert!(r[0].result.as_ref().unwrap_err().contains("no flow"));
        assert_eq!(a.agent.movable_flows().len(), 1, "still served at A");
        rest.add_permits(1);
        run.await.unwrap();
    })
    .await
    .expect("bounded");
}

/// A destination that dies half way: it proves the key, takes the snapshot, and resets the
/// agent stream before answering (what a killed process's endpoint would leave the exporter
/// with). The stream must continue where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_destination_dies_half_way_leaves_the_stream_where_it_was() {
    timeout(Duration::from_secs(60), async {
        let k = key();
        let a = instance(&k).await;
        let any: Locator = "127.0.0.1:0".parse().unwrap();
        let dying = Endpoint::bind_with(
            &[any],
            serval::EndpointConfig {
                identity: Some(k.clone()),
                ..serval::EndpointConfig::default()
            },
        )
        .await
        .unwrap();
        let mut agent = dying
            .listen(ServicePrefix::parse(serval::MIGRATE_SERVICE).unwrap())
            .unwrap();
        let took_snapshot = tokio::spawn(async move {
            let mut s = agent.accept().await.unwrap();
            let mut hello = b"SVMG\x01".to_vec();
            hello.extend_from_slice(&[7u8; 32]);
            s.write_all(&hello).await.unwrap();
            let mut proof = [0u8; 96];
            s.read_exact(&mut proof).await.unwrap();
            s.write_all(&[0xac]).await.unwrap();
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes(head[5..9].try_into().unwrap()) as usize;
            let mut snapshot = vec![0u8; len];
            s.read_exact(&mut snapshot).await.unwrap();
            s.abort();
            snapshot.len()
        });

        let rest = Arc::new(Semaphore::new(0));
        let run = started_client(&a, 60_000, &rest).await;
        let r = a
            .agent
            .move_flows(&[], dying.local_locators()[0], k.public_key())
            .await
            .unwrap();
        assert_eq!(r.len(), 1);
        let e = r[0].result.as_ref().unwrap_err();
        assert!(e.contains("transfer failed"), "{e}");
        assert!(took_snapshot.await.unwrap() > 0, "the snapshot was sent");
        assert_eq!(a.agent.movable_flows().len(), 1, "thawed at A");
        rest.add_permits(1);
        run.await.unwrap();
    })
    .await
    .expect("bounded");
}
