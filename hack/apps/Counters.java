// A small multi-threaded service for checkpoint tests (hack/build-app-images.sh
// builds it into docker.io/library/ckpt-jvm): THREADS threads each count,
// every 10 ms, in a field of their own, and a TCP endpoint on 127.0.0.1:PORT
// answers each line it reads ("counts") with one line:
//   run=<64-bit id drawn at start> t0=<count> t1=<count> ...
// The run id tells a process that went on (the same id) from one that was
// started again (a new one), whose counts would begin at 0.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.security.SecureRandom;
import java.util.concurrent.atomic.AtomicLongArray;

public final class Counters {
    public static void main(String[] args) throws Exception {
        int threads = Integer.parseInt(args[0]);
        int port = Integer.parseInt(args[1]);
        long run = new SecureRandom().nextLong() >>> 1;
        AtomicLongArray counts = new AtomicLongArray(threads);
        for (int i = 0; i < threads; i++) {
            int me = i;
            Thread t = new Thread(() -> {
                while (true) {
                    counts.incrementAndGet(me);
                    try {
                        Thread.sleep(10);
                    } catch (InterruptedException e) {
                        return;
                    }
                }
            }, "counter-" + i);
            t.setDaemon(true);
            t.start();
        }
        try (ServerSocket server = new ServerSocket(port, 16, InetAddress.getByName("127.0.0.1"))) {
            System.out.println("listening on 127.0.0.1:" + port + " run=" + run);
            System.out.flush();
            while (true) {
                Socket s = server.accept();
                Thread h = new Thread(() -> serve(s, run, counts), "client");
                h.setDaemon(true);
                h.start();
            }
        }
    }

    static void serve(Socket s, long run, AtomicLongArray counts) {
        try (s) {
            BufferedReader in = new BufferedReader(new InputStreamReader(s.getInputStream(), StandardCharsets.US_ASCII));
            OutputStream out = s.getOutputStream();
            String line;
            while ((line = in.readLine()) != null) {
                StringBuilder b = new StringBuilder("run=").append(run);
                if (line.trim().equals("counts")) {
                    for (int i = 0; i < counts.length(); i++) {
                        b.append(" t").append(i).append('=').append(counts.get(i));
                    }
                } else {
                    b.append(" error=unknown-request");
                }
                out.write(b.append('\n').toString().getBytes(StandardCharsets.US_ASCII));
                out.flush();
            }
        } catch (Exception e) {
            // The client went away.
        }
    }
}
