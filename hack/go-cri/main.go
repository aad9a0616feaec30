// go-cri: a CRI client built with Debian's grpc-go, which dials the socket the way
// the kubelet up to 1.27 does (the bare path as the target, so the bare path is
// the HTTP/2 :authority). The messages are encoded by hand from the published
// field numbers (protowire), so no generated code is needed.
//
//	go-cri SOCK calls CONTAINER_ID LOCATION   one JSON line per call: Version,
//	                                          ListContainers, GetContainerEvents,
//	                                          CheckpointContainer
//	go-cri SOCK owned N                       N RemoveContainer calls on one
//	                                          connection (the shim answers them
//	                                          itself), one JSON line each
//	go-cri SOCK hold CONTAINER_ID              on one connection, an ExecSync that
//	                                          sleeps 30 s and a GetContainerEvents
//	                                          stream; one JSON line each as they
//	                                          end; then, on a line on stdin, a
//	                                          Version call on the same ClientConn
//	go-cri bench DIRECT_SOCK SHIM_SOCK [-calls N] [-clients N] [-seconds S]
//	                                          proxy cost, as hack/proxy-bench.rs
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// raw passes protobuf bytes through unchanged.
type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(b []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), b...)
	return nil
}
func (raw) Name() string { return "proto" }

// dials counts the connections made: grpc-go dials again, silently, after a
// server's GOAWAY.
var dials int64

func dial(sock string) *grpc.ClientConn {
	dialer := func(ctx context.Context, addr string) (net.Conn, error) {
		atomic.AddInt64(&dials, 1)
		return (&net.Dialer{}).DialContext(ctx, "unix", addr)
	}
	conn, err := grpc.Dial(sock, grpc.WithInsecure(), grpc.WithContextDialer(dialer),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(raw{})))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	return conn
}

func str(field protowire.Number, s string) []byte {
	b := protowire.AppendTag(nil, field, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func varint(field protowire.Number, v uint64) []byte {
	b := protowire.AppendTag(nil, field, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// fields returns the length-delimited fields of a message, by number.
func fields(b []byte) map[protowire.Number][][]byte {
	out := map[protowire.Number][][]byte{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return out
		}
		b = b[n:]
		if typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			out[num] = append(out[num], v)
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return out
		}
		b = b[m:]
	}
	return out
}

const rt = "/runtime.v1.RuntimeService/"

func call(conn *grpc.ClientConn, method string, req []byte, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var resp []byte
	err := conn.Invoke(ctx, method, &req, &resp)
	return resp, err
}

func report(name string, err error, extra map[string]interface{}) {
	if extra == nil {
		extra = map[string]interface{}{}
	}
	extra["call"] = name
	st, _ := status.FromError(err)
	extra["code"] = st.Code().String()
	extra["message"] = st.Message()
	b, _ := json.Marshal(extra)
	fmt.Println(string(b))
}

func calls(sock, id, location string) {
	conn := dial(sock)
	defer conn.Close()
	resp, err := call(conn, rt+"Version", str(1, "v1"), 10*time.Second)
	name := ""
	if f := fields(resp)[2]; len(f) > 0 {
		name = string(f[0])
	}
	report("Version", err, map[string]interface{}{"runtime_name": name})
	resp, err = call(conn, rt+"ListContainers", nil, 10*time.Second)
	report("ListContainers", err, map[string]interface{}{"containers": len(fields(resp)[1])})

	events, err := watchEvents(conn, 2*time.Second)
	report("GetContainerEvents", err, map[string]interface{}{"events": events})

	req := append(append(str(1, id), str(2, location)...), varint(3, 60)...)
	_, err = call(conn, rt+"CheckpointContainer", req, 120*time.Second)
	report("CheckpointContainer", err, nil)
}

// watchEvents reads GetContainerEvents until the stream ends or the timeout
// passes; returns how many events came and how the stream ended.
func watchEvents(conn *grpc.ClientConn, timeout time.Duration) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	desc := &grpc.StreamDesc{StreamName: "GetContainerEvents", ServerStreams: true}
	events := 0
	s, err := conn.NewStream(ctx, desc, rt+"GetContainerEvents")
	if err == nil {
		req := []byte{}
		if err = s.SendMsg(&req); err == nil {
			err = s.CloseSend()
		}
		for err == nil {
			var ev []byte
			if err = s.RecvMsg(&ev); err == nil {
				events++
			}
		}
	}
	return events, err
}

// owned makes n calls the shim answers itself, one after another on one
// connection. Each reply carries DATA, and grpc-go's BDP estimator answers DATA
// with a PING once the last one is acknowledged: so every call here makes a
// PING that no HEADERS or DATA from containerd precedes, which a relay that
// forwards PINGs hands to containerd as a keepalive strike.
func owned(sock string, n int) {
	conn := dial(sock)
	defer conn.Close()
	for i := 0; i < n; i++ {
		_, err := call(conn, rt+"RemoveContainer", str(1, fmt.Sprintf("no-such-container-%d", i)), 10*time.Second)
		report("RemoveContainer", err, map[string]interface{}{"dials": atomic.LoadInt64(&dials)})
		// Room for the PING's ACK to come back, so that the next reply pings again.
		time.Sleep(20 * time.Millisecond)
	}
}

// hold keeps two calls in flight for a test to break the runtime under: the
// codes they end with are what the kubelet's client reports.
func hold(sock, id string) {
	conn := dial(sock)
	defer conn.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		req := append(append(str(1, id), str(2, "sleep")...), str(2, "37")...)
		_, err := call(conn, rt+"ExecSync", append(req, varint(3, 60)...), 90*time.Second)
		report("ExecSync", err, nil)
	}()
	go func() {
		defer wg.Done()
		events, err := watchEvents(conn, 90*time.Second)
		report("GetContainerEvents", err, map[string]interface{}{"events": events})
	}()
	fmt.Println(`{"call":"started"}`)
	wg.Wait()
	var line string
	fmt.Scanln(&line)
	_, err := call(conn, rt+"Version", str(1, "v1"), 30*time.Second)
	report("Version", err, nil)
}

var methods = []struct {
	name, path string
}{
	{"Version", rt + "Version"},
	{"Status", rt + "Status"},
	{"ListContainers", rt + "ListContainers"},
	{"ListImages", "/runtime.v1.ImageService/ListImages"},
	{"ContainerStatus", rt + "ContainerStatus"},
}

func request(m string, id string) []byte {
	switch m {
	case "Version":
		return str(1, "v1")
	case "ContainerStatus":
		return str(1, id)
	}
	return nil
}

func pct(v []float64, p float64) float64 {
	sort.Float64s(v)
	return v[int(float64(len(v)-1)*p+0.5)]
}

func firstContainer(conn *grpc.ClientConn) string {
	resp, err := call(conn, rt+"ListContainers", nil, 10*time.Second)
	if err != nil || len(fields(resp)[1]) == 0 {
		fmt.Fprintln(os.Stderr, "no container to ask ContainerStatus about:", err)
		os.Exit(1)
	}
	return string(fields(fields(resp)[1][0])[1][0])
}

// mark tells hack/bench/proxy.py that a phase ended, and how many calls went
// through the shim since the last mark; it reads the shim's CPU time there. The pause keeps
// the next phase's first calls out of that reading.
func mark(phase string, shimCalls int64) {
	b, _ := json.Marshal(map[string]interface{}{"mark": phase, "shim_calls": shimCalls})
	fmt.Println(string(b))
	time.Sleep(200 * time.Millisecond)
}

// throughput returns calls per second, and how many calls were made.
func throughput(sock string, clients int, secs float64, id string) (float64, int64) {
	conns := make([]*grpc.ClientConn, clients)
	for i := range conns {
		conns[i] = dial(sock)
		call(conns[i], rt+"Version", str(1, "v1"), 10*time.Second)
	}
	var done int64
	until := time.Now().Add(time.Duration(secs * float64(time.Second)))
	start := time.Now()
	var wg sync.WaitGroup
	for k, c := range conns {
		wg.Add(1)
		go func(k int, c *grpc.ClientConn) {
			defer wg.Done()
			for i := k; time.Now().Before(until); i++ {
				m := methods[i%len(methods)]
				if _, err := call(c, m.path, request(m.name, id), 10*time.Second); err != nil {
					fmt.Fprintln(os.Stderr, m.name, err)
					os.Exit(1)
				}
				atomic.AddInt64(&done, 1)
			}
		}(k, c)
	}
	wg.Wait()
	for _, c := range conns {
		c.Close()
	}
	return float64(done) / time.Since(start).Seconds(), done + int64(clients)
}

func bench(direct, shim string, n, clients int, secs float64) {
	d, s := dial(direct), dial(shim)
	id := firstContainer(d)
	type row struct {
		Method                  string  `json:"method"`
		D50, D99, S50, S99, Add float64 `json:"-"`
	}
	var lat []map[string]interface{}
	mark("start", 0)
	for _, m := range methods {
		var dv, sv []float64
		for i := 0; i < n+50; i++ {
			for w, c := range []*grpc.ClientConn{d, s} {
				t := time.Now()
				if _, err := call(c, m.path, request(m.name, id), 10*time.Second); err != nil {
					fmt.Fprintln(os.Stderr, m.name, err)
					os.Exit(1)
				}
				us := float64(time.Since(t).Nanoseconds()) / 1e3
				if i >= 50 {
					if w == 0 {
						dv = append(dv, us)
					} else {
						sv = append(sv, us)
					}
				}
			}
		}
		d50, d99, s50, s99 := pct(dv, 0.5), pct(dv, 0.99), pct(sv, 0.5), pct(sv, 0.99)
		lat = append(lat, map[string]interface{}{"method": m.name, "direct_p50_us": d50, "direct_p99_us": d99,
			"shim_p50_us": s50, "shim_p99_us": s99, "added_p50_us": s50 - d50})
	}
	mark("latency", int64(len(methods)*(n+50)))
	var dt, st []float64
	for r := 0; r < 3; r++ {
		rate, _ := throughput(direct, clients, secs, id)
		dt = append(dt, rate)
		mark("direct", 0)
		rate, calls := throughput(shim, clients, secs, id)
		st = append(st, rate)
		mark("throughput", calls)
	}
	dm, sm := pct(dt, 0.5), pct(st, 0.5)
	out, _ := json.Marshal(map[string]interface{}{"client": "go", "latency": lat, "clients": clients,
		"direct_calls_per_s": dm, "shim_calls_per_s": sm, "shim_fraction_of_direct": sm / dm})
	fmt.Println(string(out))
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: go-cri SOCK calls ID LOCATION | go-cri bench DIRECT SHIM [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "bench":
		fs := flag.NewFlagSet("bench", flag.ExitOnError)
		n := fs.Int("calls", 2000, "calls per method and path")
		c := fs.Int("clients", 32, "concurrent clients")
		s := fs.Float64("seconds", 3, "seconds per throughput slice")
		fs.Parse(os.Args[4:])
		bench(os.Args[2], os.Args[3], *n, *c, *s)
	default:
		if os.Args[2] == "hold" {
			hold(os.Args[1], os.Args[3])
			return
		}
		if os.Args[2] == "owned" {
			var n int
			fmt.Sscan(os.Args[3], &n)
			owned(os.Args[1], n)
			return
		}
		if os.Args[2] != "calls" || len(os.Args) != 5 {
			fmt.Fprintln(os.Stderr, "usage: go-cri SOCK calls ID LOCATION")
			os.Exit(2)
		}
		calls(os.Args[1], os.Args[3], os.Args[4])
	}
}
