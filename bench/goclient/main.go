// sdsclient: N SDS streams (StreamSecrets, state of the world) held by one compiled
// process, a stand-in for N Envoys (or one agent with N streams) that costs the machine
// far less than a Python client, so a bench measures the server rather than its client.
//
// Each stream asks for one secret (-resource), ACKs every response, and notes when each
// arrived (CLOCK_MONOTONIC, the clock Python's time.monotonic reads). The streams are
// spread over -connections connections: as many as streams is one connection per stream,
// as each Envoy has. With -ca/-cert/-key the connections use mutual TLS.
//
// It prints one JSON line once every stream has its first response (or failed), then
// answers one JSON line per command read on stdin:
//
//	wait K SECONDS   once every open stream has received K responses after its first (or
//	                 at SECONDS): when the first, median, 99th and last of those arrived,
//	                 {"first": t, "p50": t, "p99": t, "last": t, "received": streams, "cpu": s}
//	cpu              {"cpu": this process's CPU seconds so far}
//	quit
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

const secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

func monotonic() float64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	seconds := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return seconds(usage.Utime) + seconds(usage.Stime)
}

type stream struct {
	mu       sync.Mutex
	arrivals []float64 // every response's arrival; the first is the subscription's
}

func (s *stream) arrived(at float64) {
	s.mu.Lock()
	s.arrivals = append(s.arrivals, at)
	s.mu.Unlock()
}

// nth is the arrival of response n (0: the first), waiting until deadline.
func (s *stream) nth(n int, deadline time.Time) (float64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.arrivals) <= n {
		if time.Now().After(deadline) {
			return 0, false
		}
		s.mu.Unlock()
		time.Sleep(time.Millisecond)
		s.mu.Lock()
	}
	return s.arrivals[n], true
}

func credentialsFrom(caFile, certFile, keyFile, serverName string) (grpc.DialOption, error) {
	if caFile == "" {
		return grpc.WithTransportCredentials(insecure.NewCredentials()), nil
	}
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificates in %s", caFile)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	config := &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, ServerName: serverName}
	return grpc.WithTransportCredentials(credentials.NewTLS(config)), nil
}

// quantile of values (0 when there are none: JSON has no NaN).
func quantile(values []float64, q float64) float64 {
	if len(values) == 0 {
		return 0
	}
	sorted := append([]float64(nil), values...)
	sort.Float64s(sorted)
	index := int(q * float64(len(sorted)))
	if index >= len(sorted) {
		index = len(sorted) - 1
	}
	return sorted[index]
}

func main() {
	target := flag.String("target", "", "unix:/path or host:port")
	streams := flag.Int("streams", 1000, "streams to open")
	connections := flag.Int("connections", 4, "connections to spread them over")
	maxOpening := flag.Int("max-opening", 1000, "streams being opened at once (0: all at once)")
	resource := flag.String("resource", "ROOTCA", "the secret each stream asks for")
	nodeID := flag.String("node-id", "sdsclient", "the node id each stream names")
	caFile := flag.String("ca", "", "trust bundle (PEM): mutual TLS with -cert and -key")
	certFile := flag.String("cert", "", "client certificate chain (PEM)")
	keyFile := flag.String("key", "", "client private key (PEM)")
	serverName := flag.String("server-name", "localhost", "the name the server's certificate must carry")
	openTimeout := flag.Duration("open-timeout", 120*time.Second, "how long a stream may take to open")
	flag.Parse()

	transport, err := credentialsFrom(*caFile, *certFile, *keyFile, *serverName)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sdsclient:", err)
		os.Exit(2)
	}
	clients := make([]secretv3.SecretDiscoveryServiceClient, *connections)
	for i := range clients {
		conn, err := grpc.NewClient(*target, transport)
		if err != nil {
			fmt.Fprintln(os.Stderr, "sdsclient:", err)
			os.Exit(2)
		}
		clients[i] = secretv3.NewSecretDiscoveryServiceClient(conn)
	}
	node := &corev3.Node{Id: *nodeID, Cluster: "bench"}

	var (
		mu        sync.Mutex
		open      []*stream
		failed    = map[string]int{}
		latencies []float64
		wg        sync.WaitGroup
	)
	limit := make(chan struct{}, max(*maxOpening, 1))
	started := monotonic()
	for i := 0; i < *streams; i++ {
		wg.Add(1)
		if *maxOpening > 0 {
			limit <- struct{}{}
		}
		go func(client secretv3.SecretDiscoveryServiceClient) {
			opened := false
			defer func() {
				if !opened {
					wg.Done()
				}
			}()
			release := func() {
				if *maxOpening > 0 {
					<-limit
				}
			}
			ctx, cancelOpen := context.WithCancel(context.Background())
			timer := time.AfterFunc(*openTimeout, cancelOpen)
			call, err := client.StreamSecrets(ctx)
			fail := func(err error) {
				timer.Stop()
				release()
				mu.Lock()
				failed[status.Code(err).String()]++
				mu.Unlock()
			}
			if err != nil {
				fail(err)
				return
			}
			sent := monotonic()
			request := &discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: []string{*resource}, Node: node}
			if err := call.Send(request); err != nil {
				fail(err)
				return
			}
			s := &stream{}
			for first := true; ; first = false {
				response, err := call.Recv()
				if err != nil {
					if first {
						fail(err)
					}
					return
				}
				at := monotonic()
				s.arrived(at)
				ack := &discoveryv3.DiscoveryRequest{
					TypeUrl: secretType, ResourceNames: []string{*resource},
					VersionInfo: response.VersionInfo, ResponseNonce: response.Nonce,
				}
				if err := call.Send(ack); err != nil {
					return
				}
				if first {
					timer.Stop()
					release()
					mu.Lock()
					open = append(open, s)
					latencies = append(latencies, at-sent)
					mu.Unlock()
					opened = true
					wg.Done()
				}
			}
		}(clients[i%len(clients)])
	}
	wg.Wait()
	out := json.NewEncoder(os.Stdout)
	_ = out.Encode(map[string]any{
		"opened": len(open), "failed": failed, "open_s": monotonic() - started,
		"subscribe_p50_s": quantile(latencies, 0.5), "subscribe_p99_s": quantile(latencies, 0.99),
		"cpu": cpuSeconds(),
	})

	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		fields := strings.Fields(lines.Text())
		if len(fields) == 0 || fields[0] == "quit" {
			return
		}
		switch fields[0] {
		case "cpu":
			_ = out.Encode(map[string]any{"cpu": cpuSeconds()})
		case "wait":
			n, _ := strconv.Atoi(fields[1])
			seconds, _ := strconv.ParseFloat(fields[2], 64)
			deadline := time.Now().Add(time.Duration(seconds * float64(time.Second)))
			var arrivals []float64
			for _, s := range open {
				if at, ok := s.nth(n, deadline); ok {
					arrivals = append(arrivals, at)
				}
			}
			_ = out.Encode(map[string]any{
				"first": quantile(arrivals, 0), "last": quantile(arrivals, 1), "p50": quantile(arrivals, 0.5),
				"p99": quantile(arrivals, 0.99), "received": len(arrivals), "cpu": cpuSeconds(),
			})
		}
	}
}
