// Command istio-ca-client calls istio.v1.auth.IstioCertificateService/CreateCertificate
// with the Go client Istio itself links (istio.io/api/security/v1alpha1, built from the
// Go module proxy), the way istio-agent does: a bearer token in the "authorization"
// metadata, TLS to the CA. It reads one JSON object on stdin (address, roots, calls: each
// token, csr, validity, metadata) and prints one JSON line per call: the status code
// name, its details and cert_chain. tests/test_kube_istio.py runs it against meshca.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

type call struct {
	Token    string         `json:"token"`
	Csr      string         `json:"csr"`
	Validity int64          `json:"validity"`
	Metadata map[string]any `json:"metadata"`
}

type job struct {
	Address string `json:"address"`
	Roots   string `json:"roots"`
	Calls   []call `json:"calls"`
}

type result struct {
	Code      string   `json:"code"`
	Details   string   `json:"details"`
	CertChain []string `json:"cert_chain"`
}

func main() {
	var j job
	if err := json.NewDecoder(os.Stdin).Decode(&j); err != nil {
		fmt.Fprintln(os.Stderr, "bad job:", err)
		os.Exit(2)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(j.Roots)) {
		fmt.Fprintln(os.Stderr, "no roots")
		os.Exit(2)
	}
	host := j.Address[:strings.LastIndex(j.Address, ":")]
	creds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: host})
	conn, err := grpc.NewClient(j.Address, grpc.WithTransportCredentials(creds))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(2)
	}
	defer conn.Close()
	client := pb.NewIstioCertificateServiceClient(conn)
	out := json.NewEncoder(os.Stdout)
	for _, c := range j.Calls {
		meta, err := structpb.NewStruct(c.Metadata)
		if err != nil {
			fmt.Fprintln(os.Stderr, "metadata:", err)
			os.Exit(2)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if c.Token != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.Token)
		}
		resp, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{
			Csr: c.Csr, ValidityDuration: c.Validity, Metadata: meta,
		})
		cancel()
		r := result{Code: "OK", CertChain: []string{}}
		if err != nil {
			st := status.Convert(err)
			r = result{Code: codeName(st.Code()), Details: st.Message(), CertChain: []string{}}
		} else {
			r.CertChain = resp.CertChain
		}
		_ = out.Encode(r)
	}
}

// codeName spells a status code as gRPC's other languages do: PERMISSION_DENIED.
func codeName(code codes.Code) string {
	if code == codes.OK {
		return "OK"
	}
	var b strings.Builder
	for i, r := range code.String() {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}
