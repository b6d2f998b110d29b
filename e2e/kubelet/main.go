// Command kubelet is the end-to-end tests' stand-in for kubelet and a container runtime: it
// registers one Node, binds pending pods to it, provisions a directory-backed volume for each
// claim, and runs every pod whose image is a raftkv image as a local process — with the pod's
// args, env, mounted Secrets/ConfigMaps/volumes (bind-mounted in a private mount namespace),
// its own loopback address as the pod IP, and the pod and Service DNS names in its /etc/hosts.
// It reports phases and readiness from the container's probes and kills a process when its
// pod is deleted. Everything else (API server, controllers) is the real thing.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

type binFlags map[string]string

func (b binFlags) String() string { return fmt.Sprint(map[string]string(b)) }
func (b binFlags) Set(v string) error {
	name, path, ok := strings.Cut(v, "=")
	if !ok {
		return fmt.Errorf("want image=path, got %q", v)
	}
	b[name] = path
	return nil
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "admin kubeconfig")
	nodeName := flag.String("node-name", "e2e-node", "name of the Node to register")
	stateDir := flag.String("state-dir", "", "where pod files, volumes and logs live")
	apiHost := flag.String("apiserver-host", "127.0.0.1", "address pods reach the API server at")
	apiPort := flag.String("apiserver-port", "6443", "port pods reach the API server at")
	bins := binFlags{}
	flag.Var(bins, "bin", "image name=local binary (repeatable)")
	flag.Parse()
	if *kubeconfig == "" || *stateDir == "" || len(bins) == 0 {
		log.Fatal("--kubeconfig, --state-dir and --bin are required")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatalf("kubeconfig: %v", err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		log.Fatalf("client: %v", err)
	}
	for _, d := range []string{"pods", "volumes", "logs"} {
		if err := os.MkdirAll(*stateDir+"/"+d, 0o755); err != nil {
			log.Fatal(err)
		}
	}
	k := &kubelet{
		cs:       cs,
		node:     *nodeName,
		state:    *stateDir,
		bins:     bins,
		apiHost:  *apiHost,
		apiPort:  *apiPort,
		pods:     map[string]*podRun{},
		ips:      map[string]string{},
		nextIP:   1,
		hostsDoc: *stateDir + "/hosts",
	}
	if err := os.WriteFile(k.hostsDoc, []byte(baseHosts), 0o644); err != nil {
		log.Fatal(err)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := k.registerNode(ctx); err != nil {
		log.Fatalf("registering node: %v", err)
	}
	log.Printf("node %s registered; running pods", k.node)
	tick := time.NewTicker(300 * time.Millisecond)
	defer tick.Stop()
	lastBeat := time.Time{}
	for {
		select {
		case <-ctx.Done():
			k.stopAll()
			return
		case <-tick.C:
		}
		if time.Since(lastBeat) > 10*time.Second {
			if err := k.heartbeat(ctx); err != nil {
				log.Printf("heartbeat: %v", err)
			}
			lastBeat = time.Now()
		}
		k.provision(ctx)
		k.schedule(ctx)
		k.syncPods(ctx)
		k.writeHosts(ctx)
	}
}

const baseHosts = "127.0.0.1 localhost\n::1 localhost\n"

func (k *kubelet) registerNode(ctx context.Context) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:   k.node,
			Labels: map[string]string{"kubernetes.io/hostname": k.node, "kubernetes.io/os": "linux"},
		},
	}
	if _, err := k.cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil && !isExists(err) {
		return err
	}
	return k.heartbeat(ctx)
}

func (k *kubelet) heartbeat(ctx context.Context) error {
	node, err := k.cs.CoreV1().Nodes().Get(ctx, k.node, metav1.GetOptions{})
	if err != nil {
		return err
	}
	now := metav1.Now()
	node.Status.Capacity = corev1.ResourceList{
		corev1.ResourceCPU:    mustQuantity("64"),
		corev1.ResourceMemory: mustQuantity("64Gi"),
		corev1.ResourcePods:   mustQuantity("250"),
	}
	node.Status.Allocatable = node.Status.Capacity
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}, {Type: corev1.NodeHostName, Address: k.node}}
	node.Status.Conditions = []corev1.NodeCondition{{
		Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		Message: "process kubelet is posting ready status", LastHeartbeatTime: now, LastTransitionTime: now,
	}}
	node.Status.NodeInfo.KubeletVersion = "v1.36.3"
	node.Status.NodeInfo.OperatingSystem = "linux"
	node.Status.NodeInfo.Architecture = "amd64"
	_, err = k.cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}
