//! The node-to-node transport over real TCP on loopback: Raft messages in order, many large
//! concurrent calls, a peer going down and coming back, refused handshakes, oversized frames,
//! the network-cut hook, call timeouts, and Raft traffic overtaking block traffic.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{Message, MessageType};
use rand::{Rng, SeedableRng};
use tidepool_cluster::transport::{
    Channel, Frame, Handler, Request, Response, Transport, TransportConfig, TransportError, testing,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &[u8] = b"a cluster secret of more than 16 bytes";
const CLUSTER: &str = "test-cluster";

/// Records Raft messages; echoes, sleeps or stores on request.
#[derive(Default)]
struct TestHandler {
    raft: Mutex<Vec<(u64, Message, Instant)>>,
    /// How long a PutBlock takes (a slow device).
    put_delay: Mutex<Duration>,
    puts_started: AtomicUsize,
    puts_done: AtomicUsize,
}

impl TestHandler {
    fn raft_count(&self) -> usize {
        self.raft.lock().unwrap().len()
    }
}

#[async_trait::async_trait]
impl Handler for TestHandler {
    fn raft(&self, from: u64, msg: Message) {
        self.raft.lock().unwrap().push((from, msg, Instant::now()));
    }

    async fn request(&self, _from: u64, req: Request, body: Bytes) -> (Response, Bytes) {
        match req {
            Request::Other { kind, data } if kind == "echo" => (Response::Other { data }, body),
            Request::Other { kind, data } if kind == "sleep" => {
                let ms = u64::from_le_bytes(data.try_into().unwrap());
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (Response::Ok, Bytes::new())
            }
            Request::Join { node_id, addr } => {
                (Response::Joined { leader_id: 2, peers: vec![(node_id, addr)] }, Bytes::new())
            }
            Request::PutBlock { .. } => {
                self.puts_started.fetch_add(1, Ordering::SeqCst);
                let delay = *self.put_delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                self.puts_done.fetch_add(1, Ordering::SeqCst);
                (Response::Ok, Bytes::new())
            }
            other => (
                Response::Err {
                    kind: tidepool_cluster::transport::ErrKind::Invalid,
                    message: format!("test handler: unexpected {other:?}"),
                },
                Bytes::new(),
            ),
        }
    }
}

fn cfg(id: u64) -> TransportConfig {
    TransportConfig { node_id: id, cluster_id: CLUSTER.to_string(), secret: SECRET.to_vec(), ..Default::default() }
}

async fn start(cfg: TransportConfig) -> (Arc<Transport>, Arc<TestHandler>) {
    let h = Arc::new(TestHandler::default());
    let t = Transport::bind(cfg, h.clone()).await.expect("bind");
    (t, h)
}

/// Every node learns every other node's address.
fn mesh(nodes: &[&Arc<Transport>]) {
    for a in nodes {
        for b in nodes {
            if a.node_id() != b.node_id() {
                a.set_peer(b.node_id(), b.local_addr().to_string());
            }
        }
    }
}

fn raft_msg(from: u64, to: u64, index: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = from;
    m.to = to;
    m.index = index;
    m
}

/// Polls `f` every 5 ms until it holds or `limit` passes.
async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

fn sleep_req(ms: u64) -> Request {
    Request::Other { kind: "sleep".to_string(), data: ms.to_le_bytes().to_vec() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_arrive_in_order_between_three_nodes() {
    let (a, ha) = start(cfg(1)).await;
    let (b, hb) = start(cfg(2)).await;
    let (c, hc) = start(cfg(3)).await;
    mesh(&[&a, &b, &c]);
    const N: u64 = 500;
    // From plain threads, as the Raft driver does.
    let senders: Vec<_> = [a.clone(), b.clone(), c.clone()]
        .into_iter()
        .map(|t| {
            std::thread::spawn(move || {
                for i in 1..=N {
                    for to in [1, 2, 3] {
                        if to != t.node_id() {
                            t.send_raft(to, raft_msg(t.node_id(), to, i));
                        }
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let all =
        wait_until(Duration::from_secs(20), || [&ha, &hb, &hc].iter().all(|h| h.raft_count() == 2 * N as usize)).await;
    assert!(all, "counts: {} {} {}", ha.raft_count(), hb.raft_count(), hc.raft_count());
    for (me, h) in [(1, &ha), (2, &hb), (3, &hc)] {
        let got = h.raft.lock().unwrap();
        for from in [1u64, 2, 3].into_iter().filter(|f| *f != me) {
            let seq: Vec<u64> = got
                .iter()
                .filter(|(f, _, _)| *f == from)
                .map(|(_, m, _)| {
                    assert_eq!((m.from, m.to), (from, me));
                    m.index
                })
                .collect();
            assert_eq!(seq, (1..=N).collect::<Vec<_>>(), "node {me} from {from}");
        }
    }
    let stats = a.stats();
    for p in &stats.peers {
        assert!(p.connected, "{p:?}");
        assert!(p.messages_sent >= N && p.messages_received >= N, "{p:?}");
        assert_eq!(p.raft_dropped, 0, "{p:?}");
    }
    assert_eq!(stats.refused_handshakes, 0);
    for t in [a, b, c] {
        t.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_with_1mib_bodies_are_echoed() {
    let (a, _) = start(cfg(1)).await;
    let (b, _) = start(cfg(2)).await;
    mesh(&[&a, &b]);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let a = a.clone();
        set.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i);
            let mut body = vec![0u8; 1 << 20];
            rng.fill(&mut body[..]);
            let body = Bytes::from(body);
            let req = Request::Other { kind: "echo".to_string(), data: i.to_le_bytes().to_vec() };
            let (resp, got) = a.call(2, req, body.clone()).await.expect("call");
            assert_eq!(resp, Response::Other { data: i.to_le_bytes().to_vec() });
            assert!(got == body, "echoed body of call {i} differs");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let s = a.stats();
    let to_b = s.peers.iter().find(|p| p.node_id == 2).unwrap();
    assert!(to_b.bytes_sent >= 200 << 20 && to_b.bytes_received >= 200 << 20, "{to_b:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_to_down_peer_fails_fast_and_reconnects() {
    let (a, _) = start(cfg(1)).await;
    let (b, _) = start(cfg(2)).await;
    mesh(&[&a, &b]);
    let addr_b = b.local_addr().to_string();

    // Never up: nothing listens on port 1.
    a.set_peer(9, "127.0.0.1:1".to_string());
    let t = Instant::now();
    let err = a.call(9, Request::Ping, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());

    let (resp, _) = a.call(2, Request::Ping, Bytes::new()).await.unwrap();
    assert_eq!(resp, Response::Pong { node_id: 2 });

    b.shutdown().await;
    drop(b);
    // The open connection dies (Closed), then dialling fails (Connect): fast, no hang.
    let mut saw_connect = false;
    for _ in 0..5 {
        let t = Instant::now();
        let err = a.call(2, Request::Ping, Bytes::new()).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}: {err}", t.elapsed());
        assert!(matches!(err, TransportError::Connect { .. } | TransportError::Closed), "{err}");
        if matches!(err, TransportError::Connect { .. }) {
            saw_connect = true;
            break;
        }
    }
    assert!(saw_connect);

    // Up again on the same address: calls and Raft messages get through once the backoff ends.
    let (b2, hb2) = start(TransportConfig { listen: addr_b, ..cfg(2) }).await;
    let mut ok = false;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok((resp, _)) = a.call(2, Request::Ping, Bytes::new()).await {
            assert_eq!(resp, Response::Pong { node_id: 2 });
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "no reconnect within 10 s");
    let mut i = 0;
    let arrived = wait_until(Duration::from_secs(10), || {
        i += 1;
        a.send_raft(2, raft_msg(1, 2, i));
        hb2.raft_count() > 0
    })
    .await;
    assert!(arrived, "raft did not reconnect");
    a.shutdown().await;
    b2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_addr_reaches_a_node_not_in_the_address_book() {
    let (a, _) = start(cfg(1)).await;
    let (b, _) = start(cfg(2)).await;
    let addr_b = b.local_addr().to_string();
    assert!(a.peers().is_empty());
    let err = a.call(2, Request::Ping, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, TransportError::UnknownPeer(2)), "{err}");
    let join = Request::Join { node_id: 1, addr: a.local_addr().to_string() };
    let (id, resp, _) = a.call_addr(&addr_b, join, Bytes::new()).await.unwrap();
    assert_eq!(id, 2);
    assert_eq!(resp, Response::Joined { leader_id: 2, peers: vec![(1, a.local_addr().to_string())] });
    // Learnt from the answer, the peer goes into the book and is reachable by id.
    a.set_peer(id, addr_b.clone());
    assert_eq!(a.peers(), vec![(2, addr_b.clone())]);
    assert_eq!(a.call(2, Request::Ping, Bytes::new()).await.unwrap().0, Response::Pong { node_id: 2 });
    a.remove_peer(2);
    assert!(matches!(a.call(2, Request::Ping, Bytes::new()).await, Err(TransportError::UnknownPeer(2))));
    // The cut hook applies to call_addr too, once the answering id is known.
    a.set_blocked(2, true);
    assert!(a.call_addr(&addr_b, Request::Ping, Bytes::new()).await.is_err());
    a.shutdown().await;
    b.shutdown().await;
}

async fn expect_refused(a: &Transport, b: &Transport, reason: &str) {
    let err = a.call(b.node_id(), Request::Ping, Bytes::new()).await.unwrap_err();
    match &err {
        TransportError::Refused { reason: r, .. } => assert!(r.contains(reason), "{err}"),
        other => panic!("expected refused ({reason}), got {other}"),
    }
    let err = a.call_addr(&b.local_addr().to_string(), Request::Ping, Bytes::new()).await.unwrap_err();
    assert!(matches!(&err, TransportError::Refused { reason: r, .. } if r.contains(reason)), "{err}");
    let counted = wait_until(Duration::from_secs(2), || b.stats().refused_handshakes >= 2).await;
    assert!(counted, "refusals seen by the other side: {}", b.stats().refused_handshakes);
    assert!(a.stats().refused_handshakes >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_and_counted() {
    let (a, _) = start(cfg(1)).await;
    let (b, hb) = start(TransportConfig { secret: b"another secret, 16+ bytes".to_vec(), ..cfg(2) }).await;
    mesh(&[&a, &b]);
    expect_refused(&a, &b, "wrong cluster secret").await;
    // Raft messages do not get through either.
    for i in 1..=20 {
        a.send_raft(2, raft_msg(1, 2, i));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hb.raft_count(), 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_cluster_id_is_refused_and_counted() {
    let (a, _) = start(cfg(1)).await;
    let (b, _) = start(TransportConfig { cluster_id: "another-cluster".to_string(), ..cfg(2) }).await;
    mesh(&[&a, &b]);
    expect_refused(&a, &b, "other cluster id").await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocol_version_is_refused_with_the_reason() {
    let (b, _) = start(cfg(2)).await;
    let mut s = tokio::net::TcpStream::connect(b.local_addr()).await.unwrap();
    s.write_all(b"TPCL").await.unwrap();
    s.write_all(&99u16.to_le_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("unsupported version"), "{text:?}");
    assert!(wait_until(Duration::from_secs(2), || b.stats().refused_handshakes == 1).await);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_secret_is_a_config_error() {
    let h = Arc::new(TestHandler::default());
    let err = Transport::bind(TransportConfig::default(), h.clone()).await.err().expect("empty secret refused");
    assert!(matches!(err, TransportError::Config(_)), "{err}");
    let err = Transport::bind(TransportConfig { secret: b"15 bytes secret".to_vec(), ..cfg(1) }, h)
        .await
        .err()
        .expect("short secret refused");
    assert!(matches!(&err, TransportError::Config(m) if m.contains("secret")), "{err}");
}

/// Reads one frame's header off a raw connection.
async fn read_raw_frame(s: &mut tokio::net::TcpStream) -> Frame {
    let mut prefix = [0u8; 8];
    s.read_exact(&mut prefix).await.unwrap();
    let hl = u32::from_le_bytes(prefix[0..4].try_into().unwrap()) as usize;
    let bl = u32::from_le_bytes(prefix[4..8].try_into().unwrap()) as usize;
    let mut buf = vec![0u8; hl + bl];
    s.read_exact(&mut buf).await.unwrap();
    postcard::from_bytes(&buf[..hl]).unwrap()
}

/// True when the peer closes `s` within 5 s.
async fn closed_by_peer(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_connection_and_server_keeps_serving() {
    let (a, _) = start(cfg(1)).await;
    let (b, _) = start(cfg(2)).await;
    mesh(&[&a, &b]);
    let addr = b.local_addr().to_string();
    for (header_len, body_len) in [(16u32, (64u32 << 20) + 1), ((1u32 << 20) + 1, 0)] {
        let (id, mut s) = testing::connect_raw(&cfg(7), &addr, Channel::Data).await.unwrap();
        assert_eq!(id, 2);
        // The connection works...
        let ping = testing::encode_frame(&Frame::Request { id: 1, req: Request::Ping }, &[]).unwrap();
        s.write_all(&ping).await.unwrap();
        assert_eq!(read_raw_frame(&mut s).await, Frame::Response { id: 1, resp: Response::Pong { node_id: 2 } });
        // ...until a frame over the bounds, announced by its prefix alone.
        let mut prefix = header_len.to_le_bytes().to_vec();
        prefix.extend_from_slice(&body_len.to_le_bytes());
        s.write_all(&prefix).await.unwrap();
        assert!(closed_by_peer(&mut s).await, "connection not closed for header={header_len} body={body_len}");
    }
    // The sender refuses to build one, too.
    let err = a.call(2, Request::PutBlock { id: 1 }, Bytes::from(vec![0u8; (64 << 20) + 1])).await.unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    // Others are still served.
    let (resp, _) = a.call(2, Request::Ping, Bytes::new()).await.unwrap();
    assert_eq!(resp, Response::Pong { node_id: 2 });
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_blocked_drops_both_directions_and_unblocking_heals() {
    let short = |id| TransportConfig { call_timeout: Duration::from_millis(500), ..cfg(id) };
    let (a, ha) = start(short(1)).await;
    let (b, hb) = start(short(2)).await;
    mesh(&[&a, &b]);
    a.send_raft(2, raft_msg(1, 2, 1));
    b.send_raft(1, raft_msg(2, 1, 1));
    assert!(wait_until(Duration::from_secs(5), || ha.raft_count() == 1 && hb.raft_count() == 1).await);
    a.call(2, Request::Ping, Bytes::new()).await.unwrap();
    b.call(1, Request::Ping, Bytes::new()).await.unwrap();

    a.set_blocked(2, true);
    for i in 2..=10 {
        a.send_raft(2, raft_msg(1, 2, i));
        b.send_raft(1, raft_msg(2, 1, i));
    }
    let err = a.call(2, Request::Ping, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    // B's request reaches A, which drops it: B's call times out as over a cut network.
    let err = b.call(1, Request::Ping, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((ha.raft_count(), hb.raft_count()), (1, 1));

    a.set_blocked(2, false);
    a.send_raft(2, raft_msg(1, 2, 11));
    b.send_raft(1, raft_msg(2, 1, 11));
    assert!(wait_until(Duration::from_secs(5), || ha.raft_count() == 2 && hb.raft_count() == 2).await);
    assert_eq!(ha.raft.lock().unwrap()[1].1.index, 11);
    assert_eq!(hb.raft.lock().unwrap()[1].1.index, 11);
    a.call(2, Request::Ping, Bytes::new()).await.unwrap();
    b.call(1, Request::Ping, Bytes::new()).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_times_out_when_the_handler_sleeps_past_it() {
    let (a, _) = start(TransportConfig { call_timeout: Duration::from_millis(300), ..cfg(1) }).await;
    let (b, _) = start(cfg(2)).await;
    mesh(&[&a, &b]);
    let t = Instant::now();
    let err = a.call(2, sleep_req(3000), Bytes::new()).await.unwrap_err();
    assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    // A handler within the limit is answered, and the connection is still good.
    let (resp, _) = a.call(2, sleep_req(10), Bytes::new()).await.unwrap();
    assert_eq!(resp, Response::Ok);
    let (resp, _) = a.call(2, Request::Ping, Bytes::new()).await.unwrap();
    assert_eq!(resp, Response::Pong { node_id: 2 });
    a.shutdown().await;
    b.shutdown().await;
}

/// 32 x 4 MiB block writes to a slow device (200 ms each, 2 at a time per connection, so the
/// data connections stay backed up for about a second) and one Raft message sent meanwhile:
/// it must arrive within 200 ms, while most writes are still queued. Were Raft sharing a data
/// connection it would wait behind ~8 of them (~800 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_is_not_delayed_behind_block_traffic() {
    let (a, _) = start(TransportConfig { call_timeout: Duration::from_secs(60), ..cfg(1) }).await;
    let (b, hb) = start(TransportConfig { max_in_flight: 2, ..cfg(2) }).await;
    *hb.put_delay.lock().unwrap() = Duration::from_millis(200);
    mesh(&[&a, &b]);
    // Open the control connection first: this measures queueing, not dialling.
    a.send_raft(2, raft_msg(1, 2, 1));
    assert!(wait_until(Duration::from_secs(5), || hb.raft_count() == 1).await);

    let block = Bytes::from(vec![7u8; 4 << 20]);
    let mut set = tokio::task::JoinSet::new();
    for id in 0..32u64 {
        let (a, block) = (a.clone(), block.clone());
        set.spawn(async move { a.call(2, Request::PutBlock { id }, block).await });
    }
    assert!(wait_until(Duration::from_secs(10), || hb.puts_started.load(Ordering::SeqCst) >= 4).await);
    let sent = Instant::now();
    a.send_raft(2, raft_msg(1, 2, 2));
    assert!(wait_until(Duration::from_secs(10), || hb.raft_count() == 2).await);
    let arrived = hb.raft.lock().unwrap()[1].2;
    let done_then = hb.puts_done.load(Ordering::SeqCst);
    let latency = arrived.duration_since(sent);
    assert!(latency < Duration::from_millis(200), "raft message took {latency:?} behind block traffic");
    assert!(done_then < 24, "block traffic was not in flight: {done_then} of 32 done");
    while let Some(r) = set.join_next().await {
        let (resp, _) = r.unwrap().expect("put");
        assert_eq!(resp, Response::Ok);
    }
    assert_eq!(hb.puts_done.load(Ordering::SeqCst), 32);
    a.shutdown().await;
    b.shutdown().await;
}
