// Edge cases of the RabbitMQ Java client (Debian's librabbitmq-client-java), run against one AMQP
// address and printed one observation per line, so that a run directly against RabbitMQ and one
// through warren can be compared with diff:
//
//   CP=/usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-nop.jar
//   java -cp $CP tests/clients/JavaEdge.java amqp://guest:guest@127.0.0.1:5701 > direct.txt
//   java -cp $CP tests/clients/JavaEdge.java amqp://guest:guest@127.0.0.1:5673 > warren.txt
//   diff direct.txt warren.txt
//
// Further arguments name the scenarios to run (default: all). Observations are replies, counts,
// reply codes (never texts: those go to stderr with the timings), and which bodies arrive,
// sorted where warren documents that order differs (a queue's messages live on several
// clusters). Lines tagged [doc:...] show a difference documented in docs/semantics.md.
//
// The server-side close of the recovery scenarios uses warren's admin endpoint
// (http://$WARREN_ADMIN/clients) when WARREN_ADMIN (host:port) is set, which tells the program
// it runs through warren; else rabbitmqctl through $WARREN_DIRECT_CTL (a command prefix, e.g.
// "scripts/rabbit.sh ctl shard-a-1") when set, or RabbitMQ's management API on the AMQP port +
// 10000 (guest/guest).

import com.rabbitmq.client.*;
import com.rabbitmq.client.impl.Frame;
import com.rabbitmq.client.impl.recovery.AutorecoveringConnection;

import java.io.IOException;
import java.math.BigDecimal;
import java.net.ConnectException;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

public class JavaEdge {
    static String URI_;
    static String HOST;
    static int PORT;
    static boolean WARREN;
    static String ADMIN;
    /** Directly: how to run rabbitmqctl against the node (WARREN_DIRECT_CTL, e.g.
     * "scripts/rabbit.sh ctl shard-a-1"); without it, the node's management API. */
    static final String CTL = System.getenv("WARREN_DIRECT_CTL");
    static final String P = String.format("je.%08x.", new Random().nextInt());
    static String cur = "";
    static Connection admin;
    static Channel adminCh;
    static final List<Connection> opened = Collections.synchronizedList(new ArrayList<>());
    static final HttpClient HTTP = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();

    // ---- output -----------------------------------------------------------------------------

    static void o(String s) {
        System.out.println(cur + " | " + s);
        System.out.flush();
    }

    static void note(String s) {
        System.err.println("  (" + cur + ") " + s);
    }

    /** An error as a client observes it: the reply code of the close it carries. */
    static String err(Throwable t) {
        Throwable x = t;
        while (x != null) {
            if (x instanceof ShutdownSignalException) {
                ShutdownSignalException s = (ShutdownSignalException) x;
                note("error text: " + s.getMessage());
                // whether the close arrived before or during the call is timing: stderr only
                if (x instanceof AlreadyClosedException) note("(already closed before the call)");
                return code(s);
            }
            if (x instanceof TimeoutException) return "timeout";
            x = x.getCause();
        }
        note("error: " + t);
        return "error " + t.getClass().getSimpleName();
    }

    static String code(ShutdownSignalException s) {
        if (s == null) return "none";
        Object r = s.getReason();
        if (r instanceof AMQP.Channel.Close) return "channel.close " + ((AMQP.Channel.Close) r).getReplyCode();
        if (r instanceof AMQP.Connection.Close) return "connection.close " + ((AMQP.Connection.Close) r).getReplyCode();
        return (s.isHardError() ? "connection " : "channel ") + (r == null ? "no-reason" : r.getClass().getSimpleName());
    }

    interface Step { String run() throws Exception; }

    static void step(String label, Step s) {
        String r;
        try {
            r = s.run();
        } catch (Throwable t) {
            r = err(t);
        }
        o(label + ": " + r);
    }

    // ---- connections ------------------------------------------------------------------------

    static ConnectionFactory factory() throws Exception {
        ConnectionFactory f = new ConnectionFactory();
        f.setUri(URI_);
        f.setAutomaticRecoveryEnabled(false);
        f.setConnectionTimeout(10000);
        return f;
    }

    static Connection open(ConnectionFactory f, String name) throws Exception {
        for (int attempt = 0; ; attempt++) {
            try {
                Connection c = f.newConnection(name);
                opened.add(c);
                return c;
            } catch (ConnectException e) {
                if (attempt >= 3) throw e;
                note("connection refused, retrying in 10 s");
                Thread.sleep(10000);
            }
        }
    }

    static Connection open(String name) throws Exception {
        return open(factory(), P + name);
    }

    static Channel adm() throws Exception {
        if (admin == null || !admin.isOpen()) admin = open("admin");
        if (adminCh == null || !adminCh.isOpen()) {
            adminCh = admin.createChannel();
            adminCh.confirmSelect();
        }
        return adminCh;
    }

    static long count(String q) throws Exception {
        return adm().queueDeclarePassive(q).getMessageCount();
    }

    /** The queue's ready count once it equals want (or whatever it is after timeoutMs). */
    static long settle(String q, long want, int timeoutMs) throws Exception {
        long deadline = System.currentTimeMillis() + timeoutMs;
        long n = count(q);
        while (n != want && System.currentTimeMillis() < deadline) {
            Thread.sleep(100);
            n = count(q);
        }
        return n;
    }

    static void declare(String q) throws Exception {
        adm().queueDeclare(q, false, false, false, null);
    }

    static void publishConfirmed(String exchange, String rk, List<String> bodies) throws Exception {
        Channel ch = adm();
        for (String b : bodies) ch.basicPublish(exchange, rk, null, b.getBytes(StandardCharsets.UTF_8));
        ch.waitForConfirmsOrDie(20000);
    }

    static List<String> bodies(String prefix, int n) {
        List<String> l = new ArrayList<>();
        for (int i = 0; i < n; i++) l.add(prefix + i);
        return l;
    }

    static void cleanup(String... names) {
        for (String n : names) {
            try {
                adm().queueDelete(n);
            } catch (Exception e) {
                adminCh = null;
            }
        }
    }

    static void cleanupX(String... names) {
        for (String n : names) {
            try {
                adm().exchangeDelete(n);
            } catch (Exception e) {
                adminCh = null;
            }
        }
    }

    static boolean gen(String name) {
        // documented: warren names server-named queues warren.gen-, RabbitMQ amq.gen-
        return name != null && (name.startsWith("amq.gen-") || name.startsWith("warren.gen-"));
    }

    static String sorted(Collection<String> c) {
        List<String> l = new ArrayList<>(c);
        Collections.sort(l, Comparator.comparingInt(String::length).thenComparing(Comparator.naturalOrder()));
        return l.toString();
    }

    // ---- a consumer that records everything ---------------------------------------------------

    static class Rec extends DefaultConsumer {
        final List<String> events = Collections.synchronizedList(new ArrayList<>());
        final List<String> got = Collections.synchronizedList(new ArrayList<>());
        final Set<String> distinct = ConcurrentHashMap.newKeySet();
        final List<Long> tags = Collections.synchronizedList(new ArrayList<>());
        final AtomicInteger redelivered = new AtomicInteger();
        volatile boolean ackEach;
        volatile ShutdownSignalException shutdown;

        Rec(Channel ch, boolean ackEach) {
            super(ch);
            this.ackEach = ackEach;
        }

        @Override public void handleConsumeOk(String tag) { super.handleConsumeOk(tag); events.add("consumeOk"); }
        @Override public void handleCancelOk(String tag) { super.handleCancelOk(tag); events.add("cancelOk"); }
        @Override public void handleCancel(String tag) throws IOException { super.handleCancel(tag); events.add("cancel"); }
        @Override public void handleRecoverOk(String tag) { events.add("recoverOk"); }

        @Override public void handleShutdownSignal(String tag, ShutdownSignalException sig) {
            shutdown = sig;
            events.add("shutdown(" + code(sig) + (sig.isInitiatedByApplication() ? ",by-app" : ",by-server") + ")");
        }

        @Override public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] body) throws IOException {
            String b = new String(body, StandardCharsets.UTF_8);
            if (env.isRedeliver()) redelivered.incrementAndGet();
            tags.add(env.getDeliveryTag());
            got.add(b);
            distinct.add(b);
            if (ackEach) getChannel().basicAck(env.getDeliveryTag(), false);
        }

        boolean waitFor(java.util.function.BooleanSupplier cond, int ms) throws InterruptedException {
            long deadline = System.currentTimeMillis() + ms;
            while (!cond.getAsBoolean()) {
                if (System.currentTimeMillis() > deadline) return false;
                Thread.sleep(20);
            }
            return true;
        }

        boolean waitGot(int n, int ms) throws InterruptedException { return waitFor(() -> got.size() >= n, ms); }
        boolean waitDistinct(int n, int ms) throws InterruptedException { return waitFor(() -> distinct.size() >= n, ms); }
        boolean waitEvent(String e, int ms) throws InterruptedException {
            return waitFor(() -> { synchronized (events) { return events.stream().anyMatch(x -> x.startsWith(e)); } }, ms);
        }
        String ev() { synchronized (events) { return events.toString(); } }
    }

    // ---- HTTP: closing a connection from the server side ------------------------------------

    static String http(String method, String url, boolean auth) throws Exception {
        HttpRequest.Builder b = HttpRequest.newBuilder(java.net.URI.create(url)).timeout(Duration.ofSeconds(10));
        if (auth) b.header("Authorization", "Basic " + Base64.getEncoder().encodeToString("guest:guest".getBytes()));
        b.method(method, HttpRequest.BodyPublishers.noBody());
        HttpResponse<String> r = HTTP.send(b.build(), HttpResponse.BodyHandlers.ofString());
        note(method + " " + url + " -> " + r.statusCode());
        if (r.statusCode() >= 300) throw new IOException("HTTP " + r.statusCode() + " " + r.body());
        return r.body();
    }

    /** Runs a shell command; its standard output. */
    static String sh(String cmd) throws Exception {
        Process p = new ProcessBuilder("bash", "-c", cmd).redirectError(ProcessBuilder.Redirect.DISCARD).start();
        String out = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
        boolean done = p.waitFor(90, TimeUnit.SECONDS);
        note(cmd + " -> " + (done ? "exit " + p.exitValue() : "still running"));
        return out;
    }

    /** Close the connection named cname from the server side; true when done. */
    @SuppressWarnings("unchecked")
    static boolean killFromServer(String cname) throws Exception {
        // rabbitmqctl boots an Erlang VM for each call: seconds each on a loaded machine.
        long deadline = System.currentTimeMillis() + 90000;
        while (System.currentTimeMillis() < deadline) {
            if (WARREN) {
                Map<String, Object> r = (Map<String, Object>) new Json(http("GET", "http://" + ADMIN + "/clients", false)).parse();
                for (Object o : (List<Object>) r.get("clients")) {
                    Map<String, Object> c = (Map<String, Object>) o;
                    if (cname.equals(c.get("connection_name"))) {
                        long id = ((Number) c.get("id")).longValue();
                        http("POST", "http://" + ADMIN + "/clients/" + id + "/close?reason=java-edge", false);
                        return true;
                    }
                }
            } else if (CTL != null && !CTL.isEmpty()) {
                // rabbitmqctl sees a connection at once; the management API only once its
                // statistics are in, which a loaded machine can hold back for longer than this.
                String out = sh(CTL + " -q list_connections --no-table-headers pid client_properties");
                for (String line : out.split("\n")) {
                    int tab = line.indexOf('\t');
                    if (tab > 0 && line.contains("\"" + cname + "\"")) {
                        sh(CTL + " close_connection '" + line.substring(0, tab).trim() + "' java-edge");
                        return true;
                    }
                }
            } else {
                String base = "http://" + HOST + ":" + (PORT + 10000);
                List<Object> r = (List<Object>) new Json(http("GET", base + "/api/connections", true)).parse();
                for (Object o : r) {
                    Map<String, Object> c = (Map<String, Object>) o;
                    Map<String, Object> cp = (Map<String, Object>) c.get("client_properties");
                    if (cp != null && cname.equals(cp.get("connection_name"))) {
                        String n = URLEncoder.encode((String) c.get("name"), StandardCharsets.UTF_8).replace("+", "%20");
                        http("DELETE", base + "/api/connections/" + n, true);
                        return true;
                    }
                }
            }
            Thread.sleep(500);
        }
        return false;
    }

    /** Just enough JSON for the admin and management APIs. */
    static class Json {
        final String s;
        int i;
        Json(String s) { this.s = s; }
        Object parse() { ws(); return value(); }
        void ws() { while (i < s.length() && Character.isWhitespace(s.charAt(i))) i++; }
        Object value() {
            ws();
            char c = s.charAt(i);
            if (c == '{') {
                Map<String, Object> m = new LinkedHashMap<>();
                i++; ws();
                if (s.charAt(i) == '}') { i++; return m; }
                while (true) {
                    ws(); String k = str(); ws(); i++; // ':'
                    m.put(k, value()); ws();
                    if (s.charAt(i++) == '}') return m;
                }
            }
            if (c == '[') {
                List<Object> l = new ArrayList<>();
                i++; ws();
                if (s.charAt(i) == ']') { i++; return l; }
                while (true) {
                    l.add(value()); ws();
                    if (s.charAt(i++) == ']') return l;
                }
            }
            if (c == '"') return str();
            if (s.startsWith("true", i)) { i += 4; return true; }
            if (s.startsWith("false", i)) { i += 5; return false; }
            if (s.startsWith("null", i)) { i += 4; return null; }
            int st = i;
            while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) i++;
            return Double.parseDouble(s.substring(st, i));
        }
        String str() {
            StringBuilder b = new StringBuilder();
            i++;
            while (true) {
                char c = s.charAt(i++);
                if (c == '"') return b.toString();
                if (c == '\\') {
                    char e = s.charAt(i++);
                    switch (e) {
                        case 'n': b.append('\n'); break;
                        case 't': b.append('\t'); break;
                        case 'r': b.append('\r'); break;
                        case 'b': b.append('\b'); break;
                        case 'f': b.append('\f'); break;
                        case 'u': b.append((char) Integer.parseInt(s.substring(i, i + 4), 16)); i += 4; break;
                        default: b.append(e);
                    }
                } else b.append(c);
            }
        }
    }

    // ---- scenarios --------------------------------------------------------------------------

    static void serverProps() throws Exception {
        Connection c = open("props");
        AtomicInteger blocked = new AtomicInteger();
        c.addBlockedListener(new BlockedListener() {
            public void handleBlocked(String reason) { blocked.incrementAndGet(); }
            public void handleUnblocked() { }
        });
        c.addBlockedListener(reason -> blocked.incrementAndGet(), () -> { });
        o("connected with two BlockedListeners: open=" + c.isOpen() + " blocked=" + blocked.get());
        Map<String, Object> sp = c.getServerProperties();
        o("server property keys: " + new TreeSet<>(sp.keySet()));
        o("product=" + sp.get("product") + " version=" + sp.get("version") + " platform=" + sp.get("platform"));
        note("cluster_name=" + sp.get("cluster_name") + " information=" + sp.get("information"));
        Object caps = sp.get("capabilities");
        o("capabilities: " + (caps instanceof Map ? new TreeMap<>((Map<?, ?>) caps) : String.valueOf(caps)));
        o("negotiated frameMax=" + c.getFrameMax() + " channelMax=" + c.getChannelMax() + " heartbeat=" + c.getHeartbeat());
        ConnectionFactory f = factory();
        f.setRequestedFrameMax(4096);
        f.setRequestedChannelMax(10);
        f.setRequestedHeartbeat(5);
        Connection c2 = open(f, P + "props2");
        o("requested 4096/10/5: frameMax=" + c2.getFrameMax() + " channelMax=" + c2.getChannelMax() + " heartbeat=" + c2.getHeartbeat());
        List<Channel> chs = new ArrayList<>();
        step("open 10 channels then an 11th", () -> {
            for (int i = 0; i < 10; i++) chs.add(c2.createChannel());
            Channel x = c2.createChannel();
            return x == null ? "createChannel returned null (client-side limit)" : "opened channel " + x.getChannelNumber();
        });
        c2.close();
        c.close();
        o("closed ok");
    }

    static void recovery() throws Exception {
        String cname = P + "recovery";
        String q1 = P + "rec.q1", q2 = P + "rec.q2", x = P + "rec.x";
        ConnectionFactory f = factory();
        f.setAutomaticRecoveryEnabled(true);
        f.setTopologyRecoveryEnabled(true);
        f.setNetworkRecoveryInterval(1000);
        Connection c = open(f, cname);
        AutorecoveringConnection ac = (AutorecoveringConnection) c;
        CountDownLatch recovered = new CountDownLatch(1);
        AtomicReference<ShutdownSignalException> sd = new AtomicReference<>();
        AtomicReference<String> renamed = new AtomicReference<>();
        c.addShutdownListener(sd::set);
        ac.addRecoveryListener(new RecoveryListener() {
            public void handleRecovery(Recoverable r) { recovered.countDown(); }
            public void handleRecoveryStarted(Recoverable r) { }
        });
        ac.addQueueRecoveryListener((oldName, newName) -> renamed.set(newName));
        Channel cc = c.createChannel();
        Channel pc = c.createChannel();
        pc.confirmSelect();
        cc.basicQos(100);
        cc.queueDeclare(q1, false, false, false, null);
        cc.queueDeclare(q2, false, false, false, null);
        cc.exchangeDeclare(x, "fanout", false, false, null);
        String sq = cc.queueDeclare().getQueue();
        cc.queueBind(sq, x, "");
        o("server-named exclusive queue declared, gen prefix=" + gen(sq));
        Rec a = new Rec(cc, true), b = new Rec(cc, true), cons = new Rec(cc, false);
        cc.basicConsume(q1, false, a);
        cc.basicConsume(sq, false, b);
        cc.basicConsume(q2, false, cons);
        for (int i = 0; i < 25; i++) {
            pc.basicPublish("", q1, null, ("a" + i).getBytes());
            pc.basicPublish(x, "", null, ("b" + i).getBytes());
            pc.basicPublish("", q2, null, ("c" + i).getBytes());
        }
        step("25 x 3 confirmed before the close", () -> { pc.waitForConfirmsOrDie(10000); return "ok"; });
        a.waitDistinct(25, 10000); b.waitDistinct(25, 10000); cons.waitDistinct(25, 10000);
        o("before close: q1 consumer " + a.distinct.size() + ", fanout consumer " + b.distinct.size() + ", unacking consumer " + cons.distinct.size());
        // The Java client 5.0.0 sends an ack of the highest pre-recovery tag as basic.ack(0) (it
        // drops only tags below its offset), which RabbitMQ refuses with 406: leave that one out.
        long maxTag = 0;
        for (Rec r : new Rec[]{a, b, cons}) synchronized (r.tags) { for (long t : r.tags) maxTag = Math.max(maxTag, t); }
        List<Long> stale = new ArrayList<>();
        for (long t : new ArrayList<>(cons.tags)) if (t < maxTag) stale.add(t);
        o("closed from the server side: " + killFromServer(cname));
        boolean rec = recovered.await(30, TimeUnit.SECONDS);
        o("recovered=" + rec + " shutdown " + code(sd.get()) + " byApp=" + (sd.get() == null ? "-" : sd.get().isInitiatedByApplication()));
        o("server-named queue renamed=" + (renamed.get() != null && !renamed.get().equals(sq)) + " gen prefix=" + gen(renamed.get()));
        cons.ackEach = true;
        step("acks of pre-recovery delivery tags", () -> {
            for (long t : stale) cc.basicAck(t, false);
            return "sent";
        });
        for (int i = 25; i < 50; i++) {
            pc.basicPublish("", q1, null, ("a" + i).getBytes());
            pc.basicPublish(x, "", null, ("b" + i).getBytes());
            pc.basicPublish("", q2, null, ("c" + i).getBytes());
        }
        step("25 x 3 confirmed after recovery", () -> { pc.waitForConfirmsOrDie(10000); return "ok"; });
        a.waitDistinct(50, 10000); b.waitDistinct(50, 10000); cons.waitDistinct(50, 10000);
        Thread.sleep(500);
        note("totals a=" + a.got.size() + " b=" + b.got.size() + " c=" + cons.got.size());
        o("after: q1 consumer distinct " + a.distinct.size() + ", fanout consumer distinct " + b.distinct.size()
                + ", unacking consumer distinct " + cons.distinct.size() + " total " + cons.got.size() + " redelivered " + cons.redelivered.get());
        if (!cc.isOpen()) note("consumer channel closed: " + cc.getCloseReason().getMessage());
        o("channels open: consumer " + cc.isOpen() + " publisher " + pc.isOpen() + "; consumer events " + a.ev());
        o("q1 ready " + settle(q1, 0, 3000) + ", q2 ready " + settle(q2, 0, 3000));
        cleanup(q1, q2);
        cleanupX(x);
        c.close();
    }

    static void recoveryMidStream() throws Exception {
        String cname = P + "recovery2";
        String q = P + "rec2.q";
        declare(q);
        ConnectionFactory f = factory();
        f.setAutomaticRecoveryEnabled(true);
        f.setTopologyRecoveryEnabled(true);
        f.setNetworkRecoveryInterval(1000);
        Connection c = open(f, cname);
        CountDownLatch recovered = new CountDownLatch(1);
        ((Recoverable) c).addRecoveryListener(new RecoveryListener() {
            public void handleRecovery(Recoverable r) { recovered.countDown(); }
            public void handleRecoveryStarted(Recoverable r) { }
        });
        Channel cc = c.createChannel();
        cc.basicQos(10);
        Rec a = new Rec(cc, true);
        cc.basicConsume(q, false, a);
        Connection pubc = open("rec2-pub");
        Channel pub = pubc.createChannel();
        pub.confirmSelect();
        for (int i = 0; i < 50; i++) {
            pub.basicPublish("", q, null, ("m" + i).getBytes());
            pub.waitForConfirmsOrDie(5000);
            if (i == 20) o("closed from the server side at message 20: " + killFromServer(cname));
            Thread.sleep(30);
        }
        o("50 published with confirms on another connection");
        o("recovered=" + recovered.await(30, TimeUnit.SECONDS));
        a.waitDistinct(50, 15000);
        o("consumer got distinct " + a.distinct.size() + " of 50; queue ready " + settle(q, 0, 3000));
        cleanup(q);
        c.close();
        pubc.close();
    }

    static void rpc() throws Exception {
        String rq = P + "rpc.q";
        Connection sc = open("rpc-server");
        Channel sch = sc.createChannel();
        sch.queueDeclare(rq, false, false, true, null);
        StringRpcServer srv = new StringRpcServer(sch, rq) {
            @Override public String handleStringCall(String r) { return "re:" + r; }
        };
        Thread t = new Thread(() -> { try { srv.mainloop(); } catch (Exception e) { note("server: " + e); } });
        t.setDaemon(true);
        t.start();
        Connection cc = open("rpc-client");
        Channel ch = cc.createChannel();
        step("RpcClient default reply-to (direct reply-to), 20 calls", () -> {
            RpcClient rc = new RpcClient(ch, "", rq, 5000);
            int ok = 0;
            for (int i = 0; i < 20; i++) if (("re:m" + i).equals(rc.stringCall("m" + i))) ok++;
            RpcClient.Response resp = rc.doCall(null, "x".getBytes());
            String r = ok + "/20 correct; doCall reply correlationId set=" + (resp.getProperties().getCorrelationId() != null)
                    + " body=" + new String(resp.getBody());
            rc.close();
            return r;
        });
        step("RpcClient direct reply-to, 4 threads x 10 calls", () -> {
            RpcClient rc = new RpcClient(ch, "", rq, 5000);
            ExecutorService ex = Executors.newFixedThreadPool(4);
            AtomicInteger ok = new AtomicInteger();
            List<Future<?>> fs = new ArrayList<>();
            for (int th = 0; th < 4; th++) {
                int tt = th;
                fs.add(ex.submit(() -> {
                    for (int i = 0; i < 10; i++) {
                        String m = "t" + tt + "-" + i;
                        if (("re:" + m).equals(rc.stringCall(m))) ok.incrementAndGet();
                    }
                    return null;
                }));
            }
            for (Future<?> fu : fs) fu.get(30, TimeUnit.SECONDS);
            ex.shutdown();
            rc.close();
            return ok.get() + "/40 correct";
        });
        step("RpcClient with a server-named reply queue, 20 calls", () -> {
            String reply = ch.queueDeclare().getQueue();
            RpcClient rc = new RpcClient(ch, "", rq, reply, 5000);
            int ok = 0;
            for (int i = 0; i < 20; i++) if (("re:n" + i).equals(rc.stringCall("n" + i))) ok++;
            rc.close();
            return ok + "/20 correct, reply queue gen prefix=" + gen(reply);
        });
        step("RpcClient call to a queue nobody serves (1 s timeout)", () -> {
            RpcClient rc = new RpcClient(ch, "", P + "nobody", 1000);
            try {
                return "reply " + rc.stringCall("x");
            } finally {
                rc.close();
            }
        });
        srv.terminateMainloop();
        t.join(1000);
        note("server mainloop ended=" + !t.isAlive());
        // A server on its own server-named queue, and a MapRpcServer.
        Channel sch2 = sc.createChannel();
        MapRpcServer msrv = new MapRpcServer(sch2) {
            @Override public Map<String, Object> handleMapCall(Map<String, Object> req) {
                Map<String, Object> r = new HashMap<>(req);
                r.put("answered", true);
                return r;
            }
        };
        String mq = msrv.getQueueName();
        o("MapRpcServer server-named queue gen prefix=" + gen(mq));
        Thread t2 = new Thread(() -> { try { msrv.mainloop(); } catch (Exception e) { note("map server: " + e); } });
        t2.setDaemon(true);
        t2.start();
        step("mapCall through direct reply-to", () -> {
            RpcClient rc = new RpcClient(ch, "", mq, 5000);
            Map<String, Object> req = new HashMap<>();
            req.put("i", 42);
            req.put("s", "str");
            req.put("l", Arrays.asList(1, "two", 3L));
            Map<String, Object> r = rc.mapCall(req);
            rc.close();
            return canon(new TreeMap<>(r));
        });
        msrv.terminateMainloop();
        cc.close();
        sc.close();
    }

    static void consumerCallbacks() throws Exception {
        String q = P + "cb.q", q2 = P + "cb.q2", q3 = P + "cb.q3", q4 = P + "cb.q4";
        for (String n : new String[]{q, q2, q3, q4}) declare(n);
        Connection ca = open("cb-a");
        Channel ch = ca.createChannel();
        Rec r1 = new Rec(ch, false);
        String tag = ch.basicConsume(q, false, r1);
        r1.waitEvent("consumeOk", 3000);
        publishConfirmed("", q, bodies("r", 3));
        r1.waitGot(3, 5000);
        step("basicRecover(true) with 3 unacked", () -> { ch.basicRecover(true); return "ok"; });
        r1.waitGot(6, 5000);
        Thread.sleep(300);
        o("deliveries " + r1.got.size() + " redelivered " + r1.redelivered.get() + " bodies " + sorted(r1.distinct));
        ch.basicAck(r1.tags.get(r1.tags.size() - 1), true);
        ch.basicCancel(tag);
        r1.waitEvent("cancelOk", 3000);
        o("events after recover+cancel: " + r1.ev());
        o("queue ready after multiple ack " + settle(q, 0, 2000));

        Rec r2 = new Rec(ch, false);
        ch.basicConsume(q, false, r2);
        Connection cb = open("cb-b");
        Channel chb = cb.createChannel();
        step("delete consumed queue from another connection", () -> "deleteOk count " + chb.queueDelete(q).getMessageCount());
        r2.waitEvent("cancel", 3000);
        Thread.sleep(200);
        o("events of consumer of deleted queue: " + r2.ev() + " channel open " + ch.isOpen());

        Rec r2b = new Rec(ch, false);
        ch.basicConsume(q4, false, r2b);
        step("delete consumed queue from the consuming channel itself", () -> "deleteOk count " + ch.queueDelete(q4).getMessageCount());
        r2b.waitEvent("cancel", 3000);
        Thread.sleep(200);
        o("events: " + r2b.ev() + " channel open " + ch.isOpen());

        Channel ch2 = ca.createChannel();
        Rec r3 = new Rec(ch2, false);
        ch2.basicConsume(q2, false, r3);
        ch2.basicAck(999, false);
        r3.waitEvent("shutdown", 3000);
        o("consumer of channel closed by ack of unknown tag: " + r3.ev() + " channel open " + ch2.isOpen()
                + " close reason " + code(ch2.getCloseReason()));

        Channel ch3 = ca.createChannel();
        Rec r4 = new Rec(ch3, false);
        ch3.basicConsume(q3, true, r4);
        ca.close();
        r4.waitEvent("shutdown", 3000);
        o("consumer when its connection is closed by the client: " + r4.ev());
        o("consumer on the still-open-before-close channel: " + r2.ev());
        cb.close();
        cleanup(q2, q3);
    }

    static void confirms() throws Exception {
        String q = P + "conf.q", q2 = P + "conf.q2";
        declare(q);
        declare(q2);
        Connection c = open("confirms");
        Channel ch = c.createChannel();
        ch.confirmSelect();
        step("1000 publishes then waitForConfirmsOrDie", () -> {
            for (int i = 0; i < 1000; i++) ch.basicPublish("", q, null, ("c" + i).getBytes());
            ch.waitForConfirmsOrDie(30000);
            return "ok, next seq " + ch.getNextPublishSeqNo();
        });
        o("queue count " + settle(q, 1000, 3000));
        Channel ch2 = c.createChannel();
        ch2.confirmSelect();
        ConcurrentSkipListSet<Long> pending = new ConcurrentSkipListSet<>();
        Set<Long> acked = ConcurrentHashMap.newKeySet();
        AtomicInteger dup = new AtomicInteger(), nack = new AtomicInteger(), emptyMultiple = new AtomicInteger(), multiples = new AtomicInteger();
        ch2.addConfirmListener(new ConfirmListener() {
            public void handleAck(long seq, boolean multiple) {
                if (multiple) {
                    multiples.incrementAndGet();
                    NavigableSet<Long> head = pending.headSet(seq, true);
                    int n = 0;
                    for (Long s : new ArrayList<>(head)) {
                        if (pending.remove(s)) {
                            n++;
                            if (!acked.add(s)) dup.incrementAndGet();
                        }
                    }
                    if (n == 0) emptyMultiple.incrementAndGet();
                } else {
                    if (!pending.remove(seq)) dup.incrementAndGet();
                    acked.add(seq);
                }
            }
            public void handleNack(long seq, boolean multiple) { nack.incrementAndGet(); }
        });
        for (int i = 0; i < 1000; i++) {
            pending.add(ch2.getNextPublishSeqNo());
            ch2.basicPublish("", q2, null, ("d" + i).getBytes());
            if (i % 100 == 99) Thread.sleep(5);
        }
        long deadline = System.currentTimeMillis() + 20000;
        while (!pending.isEmpty() && System.currentTimeMillis() < deadline) Thread.sleep(20);
        note("multiple acks " + multiples.get());
        o("ConfirmListener: acked " + acked.size() + " (min " + Collections.min(acked) + " max " + Collections.max(acked)
                + ") dup " + dup.get() + " empty-multiple " + emptyMultiple.get() + " nack " + nack.get() + " pending " + pending.size());
        step("waitForConfirms after the listener saw all", () -> "" + ch2.waitForConfirms(5000));
        o("queue2 count " + settle(q2, 1000, 3000));
        Channel ch3 = c.createChannel();
        step("waitForConfirms on a non-confirm channel", () -> "" + ch3.waitForConfirms(1000));
        step("confirmSelect twice", () -> { ch2.confirmSelect(); return "ok"; });
        step("txSelect on the confirm channel", () -> { ch2.txSelect(); return "ok"; });
        c.close();
        cleanup(q, q2);
    }

    static void basicGet() throws Exception {
        String q = P + "get.q";
        declare(q);
        publishConfirmed("", q, bodies("g", 6));
        Connection c = open("get");
        Channel ch = c.createChannel();
        List<String> got = new ArrayList<>();
        GetResponse r1 = ch.basicGet(q, false);
        got.add(new String(r1.getBody()));
        o("get autoAck=false: tag " + r1.getEnvelope().getDeliveryTag() + " redelivered " + r1.getEnvelope().isRedeliver()
                + " [doc:get-count-per-cluster] messageCount " + r1.getMessageCount());
        ch.basicNack(r1.getEnvelope().getDeliveryTag(), false, true);
        Thread.sleep(200);
        o("queue count after nack-requeue " + settle(q, 6, 2000));
        GetResponse r2 = ch.basicGet(q, true);
        o("get autoAck=true: tag " + r2.getEnvelope().getDeliveryTag() + " [doc:get-count-per-cluster] messageCount " + r2.getMessageCount());
        got.add(new String(r2.getBody()));
        List<Long> counts = new ArrayList<>();
        GetResponse r;
        int redel = r2.getEnvelope().isRedeliver() ? 1 : 0;
        while ((r = ch.basicGet(q, false)) != null) {
            got.add(new String(r.getBody()));
            counts.add((long) r.getMessageCount());
            if (r.getEnvelope().isRedeliver()) redel++;
        }
        o("remaining gets: " + counts.size() + " [doc:get-count-per-cluster] counts " + counts);
        o("bodies " + sorted(got.subList(1, got.size())) + " redelivered among them " + redel);
        o("queue count with 5 unacked " + count(q) + "; messageCount() " + ch.messageCount(q) + " consumerCount() " + ch.consumerCount(q));
        step("get on empty queue", () -> "" + ch.basicGet(q, false));
        ch.basicAck(0, true);
        o("ack tag 0 multiple; queue count " + settle(q, 0, 2000));
        ch.close();
        o("queue count after channel close " + settle(q, 0, 2000));
        Channel ch2 = c.createChannel();
        step("get on missing queue", () -> "" + ch2.basicGet(P + "missing", false));
        c.close();
        cleanup(q);
    }

    static void passivePurge() throws Exception {
        String q = P + "pp.q", q2 = P + "pp.q2", q3 = P + "pp.q3";
        declare(q); declare(q2); declare(q3);
        publishConfirmed("", q, bodies("p", 7));
        publishConfirmed("", q3, bodies("d", 4));
        Connection c = open("passive");
        Channel ch = c.createChannel();
        AMQP.Queue.DeclareOk d = ch.queueDeclarePassive(q);
        o("passive: messages " + d.getMessageCount() + " consumers " + d.getConsumerCount());
        Channel c1 = c.createChannel(), c2 = c.createChannel();
        c1.basicConsume(q2, true, new Rec(c1, false));
        c2.basicConsume(q2, false, new Rec(c2, false));
        Thread.sleep(200);
        d = ch.queueDeclarePassive(q2);
        o("passive with 2 consumers: messages " + d.getMessageCount() + " consumers " + d.getConsumerCount());
        d = ch.queueDeclare(q, false, false, false, null);
        o("redeclare: messages " + d.getMessageCount() + " consumers " + d.getConsumerCount());
        o("purge: " + ch.queuePurge(q).getMessageCount() + " then purge again: " + ch.queuePurge(q).getMessageCount());
        o("delete with 4: " + ch.queueDelete(q3).getMessageCount());
        step("delete ifEmpty of queue with 0", () -> "" + ch.queueDelete(q, false, true).getMessageCount());
        step("passive declare of deleted queue", () -> "" + ch.queueDeclarePassive(q).getMessageCount());
        Channel ch2 = c.createChannel();
        step("delete ifUnused of queue with consumers", () -> "" + ch2.queueDelete(q2, true, false).getMessageCount());
        step("delete of missing queue", () -> { Channel x = c.createChannel(); return "count " + x.queueDelete(P + "missing").getMessageCount(); });
        step("purge of missing queue", () -> { Channel x = c.createChannel(); return "count " + x.queuePurge(P + "missing").getMessageCount(); });
        c.close();
        cleanup(q2);
    }

    static void recover() throws Exception {
        String q = P + "rcv.q";
        declare(q);
        publishConfirmed("", q, bodies("v", 5));
        Connection c = open("recover");
        Channel ch = c.createChannel();
        Rec r = new Rec(ch, false);
        ch.basicConsume(q, false, r);
        r.waitGot(5, 5000);
        step("basicRecover() with 5 unacked", () -> { ch.basicRecover(); return "ok"; });
        r.waitGot(10, 5000);
        Thread.sleep(300);
        o("deliveries " + r.got.size() + " redelivered " + r.redelivered.get() + " events " + r.ev());
        ch.basicAck(0, true);
        o("after ack 0 multiple: queue " + settle(q, 0, 2000));
        step("basicRecover() with none unacked", () -> { ch.basicRecover(); return "ok"; });
        step("basicRecover(false)", () -> { ch.basicRecover(false); return "ok"; });
        Thread.sleep(200);
        o("connection open " + c.isOpen() + " channel open " + ch.isOpen());
        if (c.isOpen()) c.close();
        cleanup(q);
    }

    static void tx() throws Exception {
        String q = P + "tx.q", q2 = P + "tx.q2";
        declare(q); declare(q2);
        Connection c = open("tx");
        Channel ch = c.createChannel();
        ch.txSelect();
        for (int i = 0; i < 3; i++) ch.basicPublish("", q, null, ("rb" + i).getBytes());
        ch.txRollback();
        o("after publish 3 + rollback: " + settle(q, 0, 1000));
        for (int i = 0; i < 2; i++) ch.basicPublish("", q, null, ("cm" + i).getBytes());
        o("after publish 2, before commit: " + count(q));
        ch.txCommit();
        o("after commit: " + settle(q, 2, 2000));

        publishConfirmed("", q2, bodies("t", 4));
        Channel t2 = c.createChannel();
        t2.txSelect();
        GetResponse g1 = t2.basicGet(q2, false), g2 = t2.basicGet(q2, false);
        t2.basicAck(g1.getEnvelope().getDeliveryTag(), false);
        t2.basicAck(g2.getEnvelope().getDeliveryTag(), false);
        o("2 gets + 2 acks in tx, before commit: ready " + count(q2));
        t2.txRollback();
        o("after rollback: ready " + settle(q2, 2, 1000));
        step("ack the same tags again, commit", () -> {
            t2.basicAck(g1.getEnvelope().getDeliveryTag(), false);
            t2.txCommit();
            return "ok";
        });
        try { t2.close(); } catch (Exception e) { note("close: " + e); }
        o("after commit of 1 ack and channel close: ready " + settle(q2, 3, 2000));

        Channel t3 = c.createChannel();
        t3.txSelect();
        GetResponse g3 = t3.basicGet(q2, false);
        t3.basicAck(g3.getEnvelope().getDeliveryTag(), false);
        t3.basicPublish("", q2, null, "in-tx".getBytes());
        t3.txRollback();
        t3.close();
        o("get+ack+publish rolled back, channel closed: ready " + settle(q2, 3, 2000));

        Channel t4 = c.createChannel();
        t4.txSelect();
        GetResponse g4 = t4.basicGet(q2, false);
        t4.basicNack(g4.getEnvelope().getDeliveryTag(), false, false);
        t4.basicPublish("", q2, null, "in-tx2".getBytes());
        t4.txCommit();
        o("get+nack(drop)+publish committed: ready " + settle(q2, 3, 2000));
        t4.close();

        Channel t5 = c.createChannel();
        t5.txSelect();
        Rec r = new Rec(t5, false);
        t5.basicConsume(q2, false, r);
        r.waitGot(3, 3000);
        t5.basicAck(0, true);
        t5.txCommit();
        t5.basicCancel(r.getConsumerTag());
        t5.close();
        // Which message the get above dropped depends on the cluster that answered it (docs/
        // semantics.md: order across clusters), so the bodies are counted, not named.
        o("consumer in tx channel got " + r.got.size() + " distinct " + r.distinct.size() + "; ack-all committed: ready " + settle(q2, 0, 2000));

        publishConfirmed("", q2, bodies("w", 3));
        Channel t6 = c.createChannel();
        t6.txSelect();
        for (int i = 0; i < 3; i++) t6.basicGet(q2, false);
        t6.basicAck(0, true);
        t6.txRollback();
        o("3 gets + ack-all rolled back: ready " + settle(q2, 0, 1000));
        step("ack-all (tag 0, multiple) again, commit", () -> { t6.basicAck(0, true); t6.txCommit(); return "ok"; });
        Thread.sleep(200);
        try { t6.close(); } catch (Exception e) { note("close: " + e); }
        o("after channel close: ready " + settle(q2, 0, 2000));
        adm().queuePurge(q2);

        Channel n = c.createChannel();
        step("txCommit without txSelect", () -> { n.txCommit(); return "ok"; });
        Channel n2 = c.createChannel();
        step("txRollback without txSelect", () -> { n2.txRollback(); return "ok"; });
        Channel n3 = c.createChannel();
        n3.txSelect();
        step("confirmSelect on tx channel", () -> { n3.confirmSelect(); return "ok"; });
        Channel n4 = c.createChannel();
        n4.txSelect();
        step("txSelect twice", () -> { n4.txSelect(); return "ok"; });
        step("commit with nothing", () -> { n4.txCommit(); return "ok"; });
        c.close();
        cleanup(q, q2);
    }

    static void qos() throws Exception {
        String[] qs = {P + "qos.a", P + "qos.b", P + "qos.c", P + "qos.d", P + "qos.e", "celeryev." + P + "qos.f"};
        for (String q : qs) {
            declare(q);
            publishConfirmed("", q, bodies("q", 60));
        }
        Connection c = open("qos");
        Channel a = c.createChannel(), b = c.createChannel(), cc = c.createChannel(), d = c.createChannel();
        a.basicQos(5, false);
        Rec a1 = new Rec(a, false), a2 = new Rec(a, false);
        a.basicConsume(qs[0], false, a1);
        a.basicConsume(qs[0], false, a2);
        b.basicQos(5, true);
        Rec b1 = new Rec(b, false), b2 = new Rec(b, false);
        b.basicConsume(qs[1], false, b1);
        b.basicConsume(qs[1], false, b2);
        cc.basicQos(3, false);
        cc.basicQos(7, true);
        Rec c1 = new Rec(cc, false), c2 = new Rec(cc, false);
        cc.basicConsume(qs[2], false, c1);
        cc.basicConsume(qs[2], false, c2);
        d.basicQos(4, true);
        d.basicQos(6, false);
        Rec d1 = new Rec(d, false);
        d.basicConsume(qs[3], false, d1);
        Channel e = c.createChannel(), fch = c.createChannel();
        e.basicQos(4, true);
        e.basicQos(20, false);
        Rec e1 = new Rec(e, false);
        e.basicConsume(qs[4], false, e1);
        fch.basicQos(6, false);
        Rec f1 = new Rec(fch, false);
        fch.basicConsume(qs[5], false, f1);
        Thread.sleep(1500);
        o("[doc:prefetch-split] global 4 then per-consumer 20, 1 consumer: " + e1.got.size());
        o("[doc:prefetch-split] per-consumer 6 on a control-named queue (celeryev.*): " + f1.got.size());
        o("[doc:prefetch-split] per-consumer 5, 2 consumers: " + a1.got.size() + "+" + a2.got.size() + "; ready " + count(qs[0]));
        o("[doc:prefetch-split] global 5, 2 consumers: total " + (b1.got.size() + b2.got.size()) + "; ready " + count(qs[1]));
        o("[doc:prefetch-split] per-consumer 3 + global 7, 2 consumers: " + c1.got.size() + "+" + c2.got.size() + "; ready " + count(qs[2]));
        o("[doc:prefetch-split] global 4 then per-consumer 6 set after, 1 consumer: " + d1.got.size());
        a.basicAck(a1.tags.get(0), false);
        b.basicAck(b1.got.isEmpty() ? b2.tags.get(0) : b1.tags.get(0), false);
        Thread.sleep(800);
        o("[doc:prefetch-split] after one ack each: per-consumer " + a1.got.size() + "+" + a2.got.size() + ", global total " + (b1.got.size() + b2.got.size()));
        a.basicQos(10, false);
        Rec a3 = new Rec(a, false);
        a.basicConsume(qs[0], false, a3);
        Thread.sleep(800);
        o("[doc:prefetch-split] qos raised to 10 then a 3rd consumer: old " + a1.got.size() + "+" + a2.got.size() + " new " + a3.got.size());
        step("basicQos prefetchSize 1000", () -> { c.createChannel().basicQos(1000, 10, false); return "ok"; });
        Thread.sleep(200);
        o("connection open " + c.isOpen());
        if (c.isOpen()) c.close();
        Thread.sleep(300);
        for (int i = 0; i < qs.length; i++) o("after close, ready in queue " + (char) ('a' + i) + ": " + settle(qs[i], i < 2 ? 59 : 60, 3000));
        cleanup(qs);
        Connection cq = open("qos-2");
        String[] q2 = {P + "qos.g", P + "qos.h"};
        for (String q : q2) { declare(q); publishConfirmed("", q, bodies("q", 30)); }
        for (int n : new int[]{2, 3, 4}) {
            Channel x = cq.createChannel();
            x.basicQos(n);
            Rec r = new Rec(x, false);
            x.basicConsume(q2[0], false, r);
            Thread.sleep(700);
            o("[doc:prefetch-split] prefetch " + n + ", 1 consumer: " + r.got.size());
            x.close();
            settle(q2[0], 30, 3000);
        }
        cleanup(q2);
        cq.close();
    }

    static void consumerPriority() throws Exception {
        String q = P + "prio.q", q2 = P + "prio.q2";
        declare(q); declare(q2);
        Connection c = open("prio");
        Channel hi = c.createChannel(), lo = c.createChannel();
        hi.basicQos(5);
        lo.basicQos(100);
        Rec rh = new Rec(hi, false), rl = new Rec(lo, false);
        lo.basicConsume(q, false, "", false, false, Collections.singletonMap("x-priority", 0), rl);
        hi.basicConsume(q, false, "", false, false, Collections.singletonMap("x-priority", 10), rh);
        Thread.sleep(200);
        publishConfirmed("", q, bodies("p", 20));
        rh.waitFor(() -> rh.got.size() + rl.got.size() >= 20, 5000);
        Thread.sleep(500);
        o("[doc:prefetch-split] high (prefetch 5) got " + rh.got.size() + ", low (prefetch 100) got " + rl.got.size());
        Channel hi2 = c.createChannel(), lo2 = c.createChannel();
        hi2.basicQos(100);
        lo2.basicQos(100);
        Rec rh2 = new Rec(hi2, true), rl2 = new Rec(lo2, true);
        lo2.basicConsume(q2, false, "", false, false, Collections.singletonMap("x-priority", -5), rl2);
        hi2.basicConsume(q2, false, "", false, false, Collections.singletonMap("x-priority", 5L), rh2);
        Thread.sleep(200);
        publishConfirmed("", q2, bodies("s", 20));
        rh2.waitFor(() -> rh2.got.size() + rl2.got.size() >= 20, 5000);
        Thread.sleep(500);
        o("[doc:prefetch-split] both with room: high got " + rh2.got.size() + ", low got " + rl2.got.size());
        step("x-priority as a string", () -> {
            Channel x = c.createChannel();
            x.basicConsume(q2, false, "", false, false, Collections.singletonMap("x-priority", "high"), new Rec(x, false));
            x.basicQos(1);
            return "ok";
        });
        c.close();
        cleanup(q, q2);
    }

    static void exchangeBind() throws Exception {
        String e1 = P + "xb.e1", e2 = P + "xb.e2", q = P + "xb.q";
        Connection c = open("xbind");
        Channel ch = c.createChannel();
        ch.exchangeDeclare(e1, "direct");
        ch.exchangeDeclare(e2, "fanout");
        ch.queueDeclare(q, false, false, false, null);
        ch.queueBind(q, e2, "");
        ch.exchangeBind(e2, e1, "k");
        ch.confirmSelect();
        ch.basicPublish(e1, "k", null, "one".getBytes());
        ch.basicPublish(e1, "other", null, "two".getBytes());
        ch.waitForConfirmsOrDie(5000);
        o("bound e1->e2 'k': queue " + settle(q, 1, 2000));
        ch.exchangeUnbind(e2, e1, "k");
        ch.basicPublish(e1, "k", null, "three".getBytes());
        ch.waitForConfirmsOrDie(5000);
        Thread.sleep(200);
        o("after unbind: queue " + count(q));
        step("unbind again (binding gone)", () -> { ch.exchangeUnbind(e2, e1, "k"); return "ok"; });
        Channel ch2 = c.createChannel();
        step("exchangeBind from missing exchange", () -> { ch2.exchangeBind(e2, P + "missing", "k"); return "ok"; });
        Channel ch3 = c.createChannel();
        step("exchangeBind to missing exchange", () -> { ch3.exchangeBind(P + "missing", e1, "k"); return "ok"; });
        Channel ch4 = c.createChannel();
        step("exchangeBind with arguments, then unbind without", () -> {
            ch4.exchangeBind(e2, e1, "z", Collections.singletonMap("a", 1));
            ch4.exchangeUnbind(e2, e1, "z");
            ch4.confirmSelect();
            ch4.basicPublish(e1, "z", null, "four".getBytes());
            ch4.waitForConfirmsOrDie(5000);
            Thread.sleep(200);
            return "queue " + count(q);
        });
        Channel ch5 = c.createChannel();
        step("exchangeDeclarePassive of e2 / missing", () -> {
            ch5.exchangeDeclarePassive(e2);
            ch5.exchangeDeclarePassive(P + "missing");
            return "ok";
        });
        c.close();
        cleanup(q);
        cleanupX(e1, e2);
    }

    static void headersExchange() throws Exception {
        String eh = P + "hx", qa = P + "hx.all", qy = P + "hx.any";
        Connection c = open("headers");
        Channel ch = c.createChannel();
        ch.exchangeDeclare(eh, "headers");
        ch.queueDeclare(qa, false, false, false, null);
        ch.queueDeclare(qy, false, false, false, null);
        Map<String, Object> all = new HashMap<>();
        all.put("x-match", "all"); all.put("a", 1); all.put("b", "x");
        Map<String, Object> any = new HashMap<>();
        any.put("x-match", "any"); any.put("a", 1); any.put("c", "z");
        ch.queueBind(qa, eh, "", all);
        ch.queueBind(qy, eh, "", any);
        ch.confirmSelect();
        Object[][] msgs = {
                {"ab", new Object[]{"a", 1, "b", "x"}},
                {"a", new Object[]{"a", 1}},
                {"c", new Object[]{"c", "z"}},
                {"b", new Object[]{"b", "x"}},
                {"aLong", new Object[]{"a", 1L, "b", "x"}},
                {"aStr", new Object[]{"a", "1", "b", "x"}},
                {"abc-extra", new Object[]{"a", 1, "b", "x", "c", "y", "d", true}},
                {"none", new Object[]{}},
        };
        for (Object[] m : msgs) {
            Object[] kv = (Object[]) m[1];
            Map<String, Object> h = new HashMap<>();
            for (int i = 0; i < kv.length; i += 2) h.put((String) kv[i], kv[i + 1]);
            ch.basicPublish(eh, "", new AMQP.BasicProperties.Builder().headers(h).build(), ((String) m[0]).getBytes());
        }
        ch.waitForConfirmsOrDie(5000);
        Thread.sleep(300);
        o("x-match all got " + sorted(drain(ch, qa)));
        o("x-match any got " + sorted(drain(ch, qy)));
        ch.queueUnbind(qa, eh, "", all);
        ch.basicPublish(eh, "", new AMQP.BasicProperties.Builder().headers(Collections.singletonMap("a", 1)).build(), "after-unbind".getBytes());
        ch.waitForConfirmsOrDie(5000);
        Thread.sleep(300);
        o("after unbind of all: all got " + sorted(drain(ch, qa)) + " any got " + sorted(drain(ch, qy)));
        c.close();
        cleanup(qa, qy);
        cleanupX(eh);
    }

    static List<String> drain(Channel ch, String q) throws IOException {
        List<String> l = new ArrayList<>();
        GetResponse r;
        while ((r = ch.basicGet(q, true)) != null) l.add(new String(r.getBody()));
        return l;
    }

    static void alternateAndMandatory() throws Exception {
        String ae = P + "ae", e = P + "ae.main", qa = P + "ae.q", q = P + "ae.main.q", bare = P + "ae.bare";
        Connection c = open("ae");
        Channel ch = c.createChannel();
        ch.exchangeDeclare(ae, "fanout");
        ch.exchangeDeclare(e, "direct", false, false, Collections.singletonMap("alternate-exchange", ae));
        ch.exchangeDeclare(bare, "direct");
        ch.queueDeclare(qa, false, false, false, null);
        ch.queueDeclare(q, false, false, false, null);
        ch.queueBind(qa, ae, "");
        ch.queueBind(q, e, "k");
        ch.confirmSelect();
        // Per publish: returned (code, text), acked, and whether its return came before its ack.
        // Confirms of publishes on two clusters may come in either order and coalesced
        // differently (allowed by RabbitMQ's documentation), so the events are told per publish.
        List<String> events = Collections.synchronizedList(new ArrayList<>());
        Map<Long, String> seqBody = new ConcurrentHashMap<>();
        ConcurrentSkipListSet<Long> outstanding = new ConcurrentSkipListSet<>();
        ch.addReturnListener(r -> events.add("return " + r.getReplyCode() + " " + r.getReplyText() + " " + new String(r.getBody())));
        ConfirmCallback onAck = (seq, multiple) -> {
            for (Long t : multiple ? new ArrayList<>(outstanding.headSet(seq, true)) : List.of(seq)) {
                outstanding.remove(t);
                events.add("ack " + seqBody.get(t));
            }
        };
        ch.addConfirmListener(onAck, (seq, multiple) -> events.add("nack " + seq));
        pub(ch, seqBody, outstanding, e, "k", true, null, "routed");
        pub(ch, seqBody, outstanding, e, "nope", true, null, "to-ae");
        ch.waitForConfirmsOrDie(5000);
        Thread.sleep(200);
        o("main queue " + drain(ch, q) + " ae queue " + drain(ch, qa));
        o("events (mandatory, routed or via AE): " + perPublish(events));
        events.clear();
        pub(ch, seqBody, outstanding, bare, "nope", true, null, "unroutable");
        ch.waitForConfirmsOrDie(5000);
        Thread.sleep(200);
        o("events (mandatory unroutable): " + perPublish(events));
        events.clear();
        pub(ch, seqBody, outstanding, "", P + "no-such-queue", true, null, "noq");
        pub(ch, seqBody, outstanding, "", P + "no-such-queue", false, null, "noq-nonmandatory");
        ch.waitForConfirmsOrDie(5000);
        Thread.sleep(200);
        o("events (default exchange, missing queue, mandatory then not): " + perPublish(events));
        events.clear();
        for (int i = 0; i < 20; i++) pub(ch, seqBody, outstanding, bare, "nope", true, null, "u" + i);
        ch.waitForConfirmsOrDie(5000);
        Thread.sleep(300);
        long returns, acks;
        int firstAckIdx;
        synchronized (events) {
            returns = events.stream().filter(s -> s.startsWith("return")).count();
            acks = events.stream().filter(s -> s.startsWith("ack")).count();
            firstAckIdx = events.indexOf(events.stream().filter(s -> s.startsWith("ack")).findFirst().orElse(""));
        }
        note("events " + events);
        o("20 mandatory unroutable: returns " + returns + " acks " + acks + "; per publish " + perPublish(events));
        Channel ch2 = c.createChannel();
        step("declare exchange with alternate-exchange that does not exist, publish unroutable", () -> {
            String e3 = P + "ae.dangling";
            ch2.exchangeDeclare(e3, "direct", false, true, Collections.singletonMap("alternate-exchange", P + "ae.missing"));
            ch2.confirmSelect();
            List<String> ev = Collections.synchronizedList(new ArrayList<>());
            ch2.addReturnListener(r -> ev.add("return " + r.getReplyCode()));
            ch2.basicPublish(e3, "x", true, null, "dangling".getBytes());
            ch2.waitForConfirmsOrDie(5000);
            Thread.sleep(200);
            ch2.exchangeDelete(e3);
            return ev.toString();
        });
        c.close();
        cleanup(qa, q);
        cleanupX(e, ae, bare);
    }

        static void pub(Channel ch, Map<Long, String> seqBody, Set<Long> outstanding, String ex, String rk, boolean mandatory, AMQP.BasicProperties p, String body) throws IOException {
        long seq = ch.getNextPublishSeqNo();
        seqBody.put(seq, body);
        outstanding.add(seq);
        ch.basicPublish(ex, rk, mandatory, p, body.getBytes());
    }

    /** events as "body: return CODE TEXT before ack" per publish, sorted by body. */
    static String perPublish(List<String> events) {
        TreeMap<String, String> m = new TreeMap<>(Comparator.comparingInt(String::length).thenComparing(Comparator.naturalOrder()));
        synchronized (events) {
            for (String e : events) {
                if (e.startsWith("ack ")) {
                    String b = e.substring(4);
                    m.merge(b, "ack", (x, y) -> x + " then " + y);
                } else if (e.startsWith("return ")) {
                    String[] f = e.split(" ", 4);
                    m.merge(f[3], "return " + f[1] + " " + f[2], (x, y) -> x + " then " + y);
                } else m.merge(e, "?", (x, y) -> x + y);
            }
        }
        return m.toString();
    }

static void abort() throws Exception {
        String q = P + "abort.q";
        declare(q);
        publishConfirmed("", q, bodies("x", 20));
        Connection c = open("abort-1");
        Channel ch = c.createChannel();
        Rec r = new Rec(ch, false);
        ch.basicConsume(q, false, r);
        r.waitGot(20, 5000);
        for (int i = 0; i < 5; i++) ch.basicAck(r.tags.get(i), false);
        ch.abort();
        o("channel.abort after 20 delivered, 5 acked: ready " + settle(q, 15, 5000) + "; channel open " + ch.isOpen() + " connection open " + c.isOpen());
        Channel ch2 = c.createChannel();
        Rec r2 = new Rec(ch2, false);
        ch2.basicConsume(q, false, r2);
        r2.waitGot(15, 5000);
        o("consumer on a new channel got " + r2.got.size() + " redelivered " + r2.redelivered.get());
        ch2.basicAck(r2.tags.get(0), false);
        Thread.sleep(100);
        c.abort();
        o("connection.abort after 1 more ack: ready " + settle(q, 14, 5000) + "; connection open " + c.isOpen());
        Connection c2 = open("abort-2");
        Channel ch3 = c2.createChannel();
        GetResponse g = ch3.basicGet(q, false);
        o("get then abort with it unacked: got " + (g != null));
        c2.abort();
        o("ready " + settle(q, 14, 5000));
        Connection c3 = open("abort-3");
        Channel ch4 = c3.createChannel();
        ch4.confirmSelect();
        for (int i = 0; i < 50; i++) ch4.basicPublish("", q, null, ("late" + i).getBytes());
        ch4.waitForConfirmsOrDie(5000);
        ch4.abort();
        o("50 confirmed then channel.abort: ready " + settle(q, 64, 5000));
        c3.abort();
        cleanup(q);
    }

    // canonical, type-tagged rendering of a header value
    static String canon(Object v) {
        if (v == null) return "V";
        if (v instanceof LongString) return "S:" + v.toString();
        if (v instanceof String) return "s:" + v;
        if (v instanceof Integer) return "I:" + v;
        if (v instanceof Long) return "L:" + v;
        if (v instanceof Short) return "h:" + v;
        if (v instanceof Byte) return "b:" + v;
        if (v instanceof Boolean) return "t:" + v;
        if (v instanceof Double) return "d:" + v;
        if (v instanceof Float) return "f:" + v;
        if (v instanceof BigDecimal) return "D:" + ((BigDecimal) v).unscaledValue() + "e-" + ((BigDecimal) v).scale();
        if (v instanceof Date) return "T:" + ((Date) v).getTime();
        if (v instanceof byte[]) return "x:" + HexFormat.of().formatHex((byte[]) v);
        if (v instanceof Map) {
            StringBuilder b = new StringBuilder("{");
            for (Map.Entry<?, ?> e : new TreeMap<>((Map<?, ?>) v).entrySet()) b.append(e.getKey()).append('=').append(canon(e.getValue())).append(',');
            return b.append('}').toString();
        }
        if (v instanceof List) {
            StringBuilder b = new StringBuilder("[");
            for (Object x : (List<?>) v) b.append(canon(x)).append(',');
            return b.append(']').toString();
        }
        if (v instanceof Object[]) return canon(Arrays.asList((Object[]) v));
        return "?" + v.getClass().getName() + ":" + v;
    }

    static String sha(byte[] b) throws Exception {
        return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(b)).substring(0, 16);
    }

    static String sha(String s) throws Exception { return sha(s.getBytes(StandardCharsets.UTF_8)); }

    static Map<String, Object> bigHeaders(long targetBytes) throws Exception {
        Random rnd = new Random(7);
        Map<String, Object> h = new LinkedHashMap<>();
        int i = 0;
        while (i % 50 != 0 || Frame.tableSize(h) < targetBytes) {
            String k = "k" + i;
            switch (i % 13) {
                case 0: h.put(k, "string-" + i + "-ünïcødé"); break;
                case 1: h.put(k, i); break;
                case 2: h.put(k, (long) i * 1_000_000_007L); break;
                case 3: h.put(k, new BigDecimal(java.math.BigInteger.valueOf(i * 31L - 5000), i % 7)); break;
                case 4: h.put(k, new Date((1_700_000_000L + i) * 1000L)); break;
                case 5: { byte[] b = new byte[40]; rnd.nextBytes(b); h.put(k, b); break; }
                case 6: {
                    Map<String, Object> m = new LinkedHashMap<>();
                    m.put("n", i); m.put("s", "nested"); m.put("t", new Date(1_600_000_000_000L));
                    m.put("deep", Collections.singletonMap("x", Arrays.asList(1, "y", new BigDecimal("1.50"))));
                    h.put(k, m); break;
                }
                case 7: h.put(k, Arrays.asList(i, "elem", 2.5, true, new byte[]{1, 2, 3}, Collections.singletonMap("m", 1))); break;
                case 8: h.put(k, i % 2 == 0); break;
                case 9: h.put(k, 3.25 * i); break;
                case 10: h.put(k, (short) (i % 30000)); break;
                case 11: h.put(k, (byte) (i % 100)); break;
                case 12: h.put(k, i % 26 == 12 ? null : 1.5f * i); break;
            }
            i++;
        }
        return h;
    }

    static void large() throws Exception {
        String q = P + "big.q";
        declare(q);
        Connection c = open("large");
        Channel ch = c.createChannel();
        ch.confirmSelect();
        byte[] body = new byte[1 << 20];
        new Random(1).nextBytes(body);
        Map<String, Object> h = bigHeaders(100_000);
        AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                .contentType("application/octet-stream").contentEncoding("binary").headers(h).deliveryMode(2).priority(3)
                .correlationId("corr").replyTo("reply").expiration("600000").messageId("mid").timestamp(new Date(1_700_000_000_000L))
                .type("t").userId("guest").appId("app").clusterId("cid").build();
        o("sending 1 MiB body sha " + sha(body) + ", header table " + Frame.tableSize(h) + " bytes, " + h.size() + " entries");
        ch.basicPublish("", q, props, body);
        step("confirmed", () -> { ch.waitForConfirmsOrDie(10000); return "ok"; });
        GetResponse g = ch.basicGet(q, true);
        AMQP.BasicProperties p = g.getProps();
        o("got body len " + g.getBody().length + " sha " + sha(g.getBody()) + " equal " + Arrays.equals(body, g.getBody()));
        String sent = canon(h).replace("s:", "S:"), recv = canon(p.getHeaders());
        note("first difference at " + firstDiff(sent, recv));
        o("headers sha " + sha(recv) + " equal to sent (strings as longstr) " + sent.equals(recv));
        String pp = p.getContentType() + "|" + p.getContentEncoding() + "|" + p.getDeliveryMode() + "|" + p.getPriority() + "|"
                + p.getCorrelationId() + "|" + p.getReplyTo() + "|" + p.getExpiration() + "|" + p.getMessageId() + "|"
                + p.getTimestamp().getTime() + "|" + p.getType() + "|" + p.getUserId() + "|" + p.getAppId() + "|" + p.getClusterId();
        o("properties " + pp);
        // the same through a consumer
        ch.basicPublish("", q, props, body);
        ch.waitForConfirmsOrDie(10000);
        CompletableFuture<String> fut = new CompletableFuture<>();
        ch.basicConsume(q, true, (tag, d) -> {
            try {
                fut.complete(sha(d.getBody()) + " headers " + sha(canon(d.getProperties().getHeaders())));
            } catch (Exception ex) {
                fut.complete(ex.toString());
            }
        }, tag -> { });
        o("consumed: body sha " + fut.get(10, TimeUnit.SECONDS));
        // 200 KB header table: larger than frame_max (131072), the content header cannot be split
        Connection c2 = open("large-2");
        Channel ch2 = c2.createChannel();
        ch2.confirmSelect();
        Map<String, Object> h2 = bigHeaders(200_000);
        o("frame_max " + c2.getFrameMax() + "; sending header table of " + Frame.tableSize(h2) + " bytes");
        step("publish with 200 KB headers, confirm", () -> {
            ch2.basicPublish("", q, new AMQP.BasicProperties.Builder().headers(h2).build(), "small".getBytes());
            ch2.waitForConfirmsOrDie(10000);
            return "confirmed";
        });
        Thread.sleep(500);
        o("connection open " + c2.isOpen() + " close reason " + code(c2.getCloseReason()) + "; queue " + settle(q, 0, 1000));
        step("the queue via basicGet", () -> {
            GetResponse r = adm().basicGet(q, true);
            return r == null ? "empty" : "got headers sha " + sha(canon(r.getProps().getHeaders()));
        });
        if (c2.isOpen()) c2.close();
        c.close();
        cleanup(q);
    }

    static String firstDiff(String a, String b) {
        int n = Math.min(a.length(), b.length());
        for (int i = 0; i < n; i++)
            if (a.charAt(i) != b.charAt(i))
                return i + ": sent ..." + a.substring(Math.max(0, i - 40), Math.min(a.length(), i + 40)) + " got ..." + b.substring(Math.max(0, i - 40), Math.min(b.length(), i + 40));
        return a.length() == b.length() ? "none" : "length " + a.length() + " vs " + b.length();
    }

    static void nowait() throws Exception {
        String q = P + "nw.q", x = P + "nw.x";
        Connection c = open("nowait");
        Channel ch = c.createChannel();
        ch.exchangeDeclareNoWait(x, "topic", false, false, false, null);
        ch.queueDeclareNoWait(q, false, false, false, null);
        ch.queueBindNoWait(q, x, "a.#", null);
        ch.confirmSelect();
        for (int i = 0; i < 5; i++) ch.basicPublish(x, "a.b." + i, null, ("n" + i).getBytes());
        ch.basicPublish(x, "b.a", null, "miss".getBytes());
        step("confirms after nowait declare/bind", () -> { ch.waitForConfirmsOrDie(5000); return "ok"; });
        o("queue " + settle(q, 5, 2000));
        ch.exchangeUnbindNoWait(x, x, "self", null);
        o("nowait unbind of a missing e2e binding: channel open " + ch.isOpen());
        ch.queuePurge(q);
        ch.queueDeleteNoWait(q, false, false);
        ch.exchangeDeleteNoWait(x, false);
        Thread.sleep(200);
        Channel ch2 = c.createChannel();
        step("passive declare after nowait delete", () -> "" + ch2.queueDeclarePassive(q).getMessageCount());
        Channel ch3 = c.createChannel();
        step("nowait declare conflicting with existing queue, then a sync call", () -> {
            ch3.queueDeclare(q, false, false, false, null);
            ch3.queueDeclareNoWait(q, true, false, false, null);
            ch3.queueDeclarePassive(q);
            return "ok";
        });
        Thread.sleep(200);
        o("channel open " + ch3.isOpen() + " connection open " + c.isOpen());
        if (c.isOpen()) c.close();
        cleanup(q);
    }

    static void errors() throws Exception {
        String q = P + "err.q", eq = P + "err.excl";
        declare(q);
        Connection c = open("errors");
        Connection other = open("errors-other");
        Channel oc = other.createChannel();
        oc.queueDeclare(eq, false, true, false, null);
        step("passive declare of missing queue", () -> { c.createChannel().queueDeclarePassive(P + "missing"); return "ok"; });
        step("redeclare with different durable", () -> { c.createChannel().queueDeclare(q, true, false, false, null); return "ok"; });
        step("redeclare with x-message-ttl", () -> {
            c.createChannel().queueDeclare(q, false, false, false, Collections.singletonMap("x-message-ttl", 1000));
            return "ok";
        });
        step("exclusive queue of another connection: passive", () -> { c.createChannel().queueDeclarePassive(eq); return "ok"; });
        step("exclusive queue of another connection: consume", () -> {
            Channel x = c.createChannel();
            x.basicConsume(eq, true, new Rec(x, false));
            return "ok";
        });
        step("exclusive queue of another connection: get", () -> { c.createChannel().basicGet(eq, true); return "ok"; });
        step("exclusive consumer then a second consumer", () -> {
            Channel x = c.createChannel();
            x.basicConsume(q, false, "", false, true, null, new Rec(x, false));
            Channel y = c.createChannel();
            y.basicConsume(q, false, new Rec(y, false));
            return "ok";
        });
        step("publish to missing exchange, then waitForConfirms", () -> {
            Channel x = c.createChannel();
            x.confirmSelect();
            x.basicPublish(P + "missing", "k", null, "x".getBytes());
            x.waitForConfirmsOrDie(5000);
            return "ok";
        });
        step("publish to missing exchange on a non-confirm channel, then a sync call", () -> {
            Channel x = c.createChannel();
            x.basicPublish(P + "missing", "k", null, "x".getBytes());
            x.queueDeclarePassive(q);
            return "ok";
        });
        step("declare amq.* queue", () -> { c.createChannel().queueDeclare("amq.je-" + P, false, false, false, null); return "ok"; });
        step("exchange type mismatch", () -> {
            Channel x = c.createChannel();
            x.exchangeDeclare(P + "err.x", "direct", false, true, null);
            x.exchangeDeclare(P + "err.x", "fanout", false, true, null);
            return "ok";
        });
        step("basicCancel of unknown tag", () -> { c.createChannel().basicCancel("no-such-tag"); return "ok"; });
        step("reject of unknown tag, then sync call", () -> {
            Channel x = c.createChannel();
            x.basicReject(77, true);
            x.queueDeclarePassive(q);
            return "ok";
        });
        step("queue name of 256 chars", () -> {
            char[] n = new char[256];
            Arrays.fill(n, 'a');
            c.createChannel().queueDeclare(new String(n), false, false, true, null);
            return "ok";
        });
        step("connection still open", () -> "" + c.isOpen());
        step("channel with explicit number 100, reused after close", () -> {
            Channel x = c.createChannel(100);
            x.queueDeclarePassive(q);
            x.close();
            Channel y = c.createChannel(100);
            y.queueDeclarePassive(q);
            return "ok " + y.getChannelNumber();
        });
        step("unknown exchange type", () -> { c.createChannel().exchangeDeclare(P + "err.y", "no-such-type"); return "ok"; });
        step("connection open after it", () -> "" + c.isOpen());
        if (c.isOpen()) c.close();
        other.close();
        cleanup(q);
        cleanupX(P + "err.x");
    }

    // ---- main -------------------------------------------------------------------------------

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: JavaEdge.java AMQP_URI [SCENARIO ...]");
            System.exit(2);
        }
        URI_ = args[0];
        java.net.URI u = java.net.URI.create(args[0]);
        HOST = u.getHost();
        PORT = u.getPort() == -1 ? 5672 : u.getPort();
        ADMIN = System.getenv("WARREN_ADMIN");
        WARREN = ADMIN != null && !ADMIN.isEmpty();
        LinkedHashMap<String, Callable<Void>> all = new LinkedHashMap<>();
        all.put("server_props", () -> { serverProps(); return null; });
        all.put("recovery", () -> { recovery(); return null; });
        all.put("recovery_mid_stream", () -> { recoveryMidStream(); return null; });
        all.put("rpc", () -> { rpc(); return null; });
        all.put("consumer_callbacks", () -> { consumerCallbacks(); return null; });
        all.put("confirms", () -> { confirms(); return null; });
        all.put("basic_get", () -> { basicGet(); return null; });
        all.put("passive_purge", () -> { passivePurge(); return null; });
        all.put("recover", () -> { recover(); return null; });
        all.put("tx", () -> { tx(); return null; });
        all.put("qos", () -> { qos(); return null; });
        all.put("consumer_priority", () -> { consumerPriority(); return null; });
        all.put("exchange_bind", () -> { exchangeBind(); return null; });
        all.put("headers_exchange", () -> { headersExchange(); return null; });
        all.put("alternate_mandatory", () -> { alternateAndMandatory(); return null; });
        all.put("abort", () -> { abort(); return null; });
        all.put("large", () -> { large(); return null; });
        all.put("nowait", () -> { nowait(); return null; });
        all.put("errors", () -> { errors(); return null; });
        List<String> which = args.length > 1 ? Arrays.asList(args).subList(1, args.length) : new ArrayList<>(all.keySet());
        long t0 = System.currentTimeMillis();
        for (String name : which) {
            Callable<Void> s = all.get(name);
            cur = name;
            if (s == null) { o("unknown scenario"); continue; }
            long t = System.currentTimeMillis();
            try {
                s.call();
            } catch (Throwable e) {
                o("SCENARIO FAILED: " + err(e));
                e.printStackTrace();
            }
            System.err.printf("%s: %.1f s%n", name, (System.currentTimeMillis() - t) / 1000.0);
            synchronized (opened) {
                for (Connection c : opened) if (c != admin && c.isOpen()) try { c.abort(); } catch (Exception ignored) { }
                opened.removeIf(c -> c != admin);
            }
        }
        System.err.printf("total: %.1f s%n", (System.currentTimeMillis() - t0) / 1000.0);
        if (admin != null && admin.isOpen()) admin.close();
        System.exit(0);
    }
}
