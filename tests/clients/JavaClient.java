// The RabbitMQ Java client against one AMQP address (warren, or RabbitMQ directly).
//
//   java -cp /usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar \
//        tests/clients/JavaClient.java amqp://guest:guest@127.0.0.1:5673
//
// (Java 11+ runs a single source file directly; the client is Debian's librabbitmq-client-java.)
// What a Java service relies on: confirmed publishes with waitForConfirmsOrDie, a mandatory
// unroutable publish coming back to the ReturnListener, a consumer with basicQos and manual
// acks receiving every message exactly once (a basicNack with requeue gives one back once),
// basicGet of a 1 MiB message through 4096-byte frames, a transaction (rollback discards, commit
// publishes), and the counts of passive declare, purge and delete. Order is not asserted: through
// warren with two shard clusters a queue's messages live on both. Exits 0 when all hold.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import com.rabbitmq.client.GetResponse;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Map;
import java.util.Random;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;

public class JavaClient {
    static final int N = 500;
    static int failed = 0;

    static void check(boolean ok, String what) {
        System.out.println("  [" + (ok ? "PASS" : "FAIL") + "] " + what);
        if (!ok) failed++;
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: JavaClient.java AMQP_URI");
            System.exit(2);
        }
        try {
            run(args[0]);
        } catch (Exception e) {
            System.err.println("java: error: " + e);
            System.exit(1);
        }
        System.out.println(failed == 0 ? "java: all checks passed" : "java: " + failed + " check(s) failed");
        System.exit(failed == 0 ? 0 : 1);
    }

    static void run(String uri) throws Exception {
        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(uri);
        factory.setRequestedFrameMax(4096);
        factory.setRequestedHeartbeat(10);
        factory.setAutomaticRecoveryEnabled(false);
        Connection conn = factory.newConnection("warren-java-client-test");
        Map<String, Object> props = conn.getServerProperties();
        Object caps = props.get("capabilities");
        check(caps instanceof Map && Boolean.TRUE.equals(((Map<?, ?>) caps).get("publisher_confirms")),
                "server advertises publisher_confirms (" + props.get("product") + " " + props.get("version") + ")");
        check(conn.getFrameMax() == 4096, "frame_max negotiated to 4096 (got " + conn.getFrameMax() + ")");

        Channel ch = conn.createChannel();
        String queue = "clients-java-" + UUID.randomUUID().toString().substring(0, 12);
        ch.queueDeclare(queue, false, false, false, null);

        // Confirmed publishes.
        ch.confirmSelect();
        CountDownLatch returned = new CountDownLatch(1);
        AtomicInteger returnCode = new AtomicInteger();
        ch.addReturnListener(r -> {
            returnCode.set(r.getReplyCode());
            returned.countDown();
        });
        for (int i = 0; i < N; i++) {
            AMQP.BasicProperties p = new AMQP.BasicProperties.Builder()
                    .deliveryMode(2).messageId(Integer.toString(i)).build();
            ch.basicPublish("", queue, p, ("msg-" + i).getBytes(StandardCharsets.UTF_8));
        }
        ch.waitForConfirmsOrDie(30_000);
        check(true, N + " publishes confirmed (waitForConfirmsOrDie)");

        // A mandatory publish nobody can route comes back before its confirm.
        ch.basicPublish("", queue + "-nowhere", true, null, "lost".getBytes(StandardCharsets.UTF_8));
        ch.waitForConfirmsOrDie(10_000);
        check(returned.await(10, TimeUnit.SECONDS) && returnCode.get() == 312,
                "mandatory unroutable publish returned with 312 (got " + returnCode.get() + ")");
        check(ch.queueDeclarePassive(queue).getMessageCount() == N, "passive declare counts " + N);

        // A consumer with a prefetch of 10; message 7 is nacked once with requeue.
        Channel consumer = conn.createChannel();
        consumer.basicQos(10);
        Map<String, Integer> seen = new ConcurrentHashMap<>();
        AtomicBoolean nacked = new AtomicBoolean();
        AtomicBoolean redelivered = new AtomicBoolean();
        CountDownLatch all = new CountDownLatch(1);
        String tag = consumer.basicConsume(queue, false, new DefaultConsumer(consumer) {
            @Override
            public void handleDelivery(String ctag, Envelope env, AMQP.BasicProperties p, byte[] body)
                    throws java.io.IOException {
                String id = p.getMessageId();
                if ("7".equals(id) && nacked.compareAndSet(false, true)) {
                    getChannel().basicNack(env.getDeliveryTag(), false, true);
                    return;
                }
                if ("7".equals(id)) redelivered.set(env.isRedeliver());
                seen.merge(id, 1, Integer::sum);
                getChannel().basicAck(env.getDeliveryTag(), false);
                if (seen.size() == N) all.countDown();
            }
        });
        boolean complete = all.await(60, TimeUnit.SECONDS);
        long twice = seen.values().stream().filter(c -> c > 1).count();
        check(complete && seen.size() == N && twice == 0,
                "consumer got all " + N + " exactly once (" + seen.size() + " distinct, " + twice + " twice)");
        check(redelivered.get(), "the nacked message came back once, marked redelivered");
        consumer.basicCancel(tag);
        consumer.close();

        // 1 MiB through 4096-byte frames, fetched with basicGet.
        byte[] big = new byte[1024 * 1024];
        new Random(42).nextBytes(big);
        ch.basicPublish("", queue, null, big);
        ch.waitForConfirmsOrDie(30_000);
        GetResponse got = null;
        for (int i = 0; i < 100 && got == null; i++) {
            got = ch.basicGet(queue, true);
            if (got == null) Thread.sleep(50);
        }
        check(got != null && Arrays.equals(got.getBody(), big), "1 MiB message round trip (basicGet) intact");

        // A transaction on its own channel.
        Channel tx = conn.createChannel();
        tx.txSelect();
        for (int i = 0; i < 3; i++) tx.basicPublish("", queue, null, ("rolled-back-" + i).getBytes(StandardCharsets.UTF_8));
        tx.txRollback();
        for (int i = 0; i < 2; i++) tx.basicPublish("", queue, null, ("committed-" + i).getBytes(StandardCharsets.UTF_8));
        tx.txCommit();
        int count = ch.queueDeclarePassive(queue).getMessageCount();
        check(count == 2, "after rollback and commit the queue holds the 2 committed (got " + count + ")");
        tx.close();

        int purged = ch.queuePurge(queue).getMessageCount();
        check(purged == 2, "purge reports 2 (got " + purged + ")");
        int deleted = ch.queueDelete(queue).getMessageCount();
        check(deleted == 0, "delete reports 0 (got " + deleted + ")");
        ch.close();
        conn.close();
        check(true, "no channel or connection error");
    }
}
