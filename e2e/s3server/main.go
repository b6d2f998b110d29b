// Command e2e-s3 is the S3 server the operator's backup tests write to: gofakes3 (an
// in-memory implementation of the S3 API) behind a check of every request's AWS Signature
// Version 4, header-signed or presigned, recomputed with the AWS SDK's own signer. A request
// signed with the wrong key, for another region, over a tampered body or past its expiry gets
// 403 SignatureDoesNotMatch (or AccessDenied), as from S3.
//
//	e2e-s3 --addr 127.0.0.1:9000 --access-key AK --secret-key SK --bucket backups
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9000", "listen address")
	access := flag.String("access-key", "", "the access key id requests must be signed with")
	secret := flag.String("secret-key", "", "its secret")
	region := flag.String("region", "us-east-1", "the region requests must be signed for")
	bucket := flag.String("bucket", "", "a bucket to create at start")
	flag.Parse()
	if *access == "" || *secret == "" {
		log.Fatal("--access-key and --secret-key are required")
	}
	backend := s3mem.New()
	if *bucket != "" {
		if err := backend.CreateBucket(*bucket); err != nil {
			log.Fatal(err)
		}
	}
	fake := gofakes3.New(backend, gofakes3.WithIntegrityCheck(true))
	v := &verifier{creds: aws.Credentials{AccessKeyID: *access, SecretAccessKey: *secret}, region: *region, next: fake.Server()}
	log.Printf("S3 on %s (bucket %q, region %s)", *addr, *bucket, *region)
	log.Fatal(http.ListenAndServe(*addr, v))
}

type verifier struct {
	creds  aws.Credentials
	region string
	next   http.Handler
}

func deny(w http.ResponseWriter, code, msg string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(http.StatusForbidden)
	fmt.Fprintf(w, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>", code, msg)
}

func (v *verifier) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var err error
	if r.URL.Query().Get("X-Amz-Signature") != "" {
		err = v.checkPresigned(r)
	} else {
		err = v.checkHeader(r)
	}
	if err != nil {
		log.Printf("refused %s %s: %v", r.Method, r.URL.Path, err)
		deny(w, err.(denial).code, err.Error())
		return
	}
	v.next.ServeHTTP(w, r)
}

type denial struct{ code, msg string }

func (d denial) Error() string { return d.msg }

func mismatch(format string, args ...any) error {
	return denial{"SignatureDoesNotMatch", fmt.Sprintf(format, args...)}
}

// checkHeader: an Authorization header, recomputed over the headers it says it signed.
func (v *verifier) checkHeader(r *http.Request) error {
	auth := r.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 ") {
		return denial{"AccessDenied", "the request is not signed with AWS Signature Version 4"}
	}
	fields := map[string]string{}
	for _, part := range strings.Split(strings.TrimPrefix(auth, "AWS4-HMAC-SHA256 "), ",") {
		if k, val, ok := strings.Cut(strings.TrimSpace(part), "="); ok {
			fields[k] = val
		}
	}
	scope := strings.Split(fields["Credential"], "/")
	if len(scope) != 5 || scope[0] != v.creds.AccessKeyID {
		return denial{"InvalidAccessKeyId", "unknown access key"}
	}
	if scope[2] != v.region || scope[3] != "s3" || scope[4] != "aws4_request" {
		return mismatch("credential scope %q is not for %s/s3", fields["Credential"], v.region)
	}
	when, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		return mismatch("bad X-Amz-Date")
	}
	if d := time.Since(when); d > 15*time.Minute || d < -15*time.Minute {
		return denial{"RequestTimeTooSkewed", "the request time is too far from the server's"}
	}
	payload := r.Header.Get("X-Amz-Content-Sha256")
	if payload == "" {
		return mismatch("no x-amz-content-sha256")
	}
	if payload != "UNSIGNED-PAYLOAD" {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return mismatch("reading the body: %v", err)
		}
		sum := sha256.Sum256(body)
		if hex.EncodeToString(sum[:]) != payload {
			return denial{"XAmzContentSHA256Mismatch", "the body does not match x-amz-content-sha256"}
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	clone, err := http.NewRequest(r.Method, "http://"+r.Host+r.URL.RequestURI(), nil)
	if err != nil {
		return mismatch("%v", err)
	}
	clone.Host = r.Host
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		switch h {
		case "host":
		case "content-length":
			clone.ContentLength = r.ContentLength
		default:
			for _, val := range r.Header.Values(h) {
				clone.Header.Add(h, val)
			}
		}
	}
	if err := v4.NewSigner().SignHTTP(context.Background(), v.creds, clone, payload, "s3", v.region, when); err != nil {
		return mismatch("%v", err)
	}
	if got, want := fields["Signature"], signatureOf(clone.Header.Get("Authorization")); got != want {
		return mismatch("the signature does not match (expected one over %q)", clone.Header.Get("Authorization"))
	}
	return nil
}

// checkPresigned: the query's signature, recomputed with the same parameters, and its expiry.
func (v *verifier) checkPresigned(r *http.Request) error {
	q := r.URL.Query()
	scope := strings.Split(q.Get("X-Amz-Credential"), "/")
	if len(scope) != 5 || scope[0] != v.creds.AccessKeyID {
		return denial{"InvalidAccessKeyId", "unknown access key"}
	}
	if scope[2] != v.region || scope[3] != "s3" || scope[4] != "aws4_request" {
		return mismatch("credential scope %q is not for %s/s3", q.Get("X-Amz-Credential"), v.region)
	}
	when, err := time.Parse("20060102T150405Z", q.Get("X-Amz-Date"))
	if err != nil {
		return mismatch("bad X-Amz-Date")
	}
	expires, err := strconv.Atoi(q.Get("X-Amz-Expires"))
	if err != nil || expires < 1 || expires > 604800 {
		return denial{"AuthorizationQueryParametersError", "bad X-Amz-Expires"}
	}
	if time.Now().After(when.Add(time.Duration(expires) * time.Second)) {
		return denial{"AccessDenied", "Request has expired"}
	}
	got := q.Get("X-Amz-Signature")
	for _, k := range []string{"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-SignedHeaders", "X-Amz-Signature"} {
		q.Del(k)
	}
	u := url.URL{Scheme: "http", Host: r.Host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: q.Encode()}
	clone, err := http.NewRequest(r.Method, u.String(), nil)
	if err != nil {
		return mismatch("%v", err)
	}
	signed, _, err := v4.NewSigner().PresignHTTP(context.Background(), v.creds, clone, "UNSIGNED-PAYLOAD", "s3", v.region, when)
	if err != nil {
		return mismatch("%v", err)
	}
	su, err := url.Parse(signed)
	if err != nil {
		return mismatch("%v", err)
	}
	if want := su.Query().Get("X-Amz-Signature"); got != want {
		return mismatch("the presigned URL's signature does not match")
	}
	return nil
}

func signatureOf(auth string) string {
	_, sig, _ := strings.Cut(auth, "Signature=")
	return sig
}
