package main

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

type kubelet struct {
	cs       kubernetes.Interface
	node     string
	state    string
	bins     map[string]string
	apiHost  string
	apiPort  string
	pods     map[string]*podRun // by pod UID
	ips      map[string]string  // by namespace/name
	nextIP   int
	hostsDoc string
	hosts    string
}

// podRun is one pod's process and what is known about it.
type podRun struct {
	mu        sync.Mutex
	pod       *corev1.Pod
	ip        string
	dir       string
	cmd       *exec.Cmd
	exited    chan struct{}
	restarts  int32
	nextStart time.Time
	ready     bool
	started   time.Time
	stopping  bool
	lastProbe time.Time
	failures  int32
	reported  string
	// done is set once a container that is not restarted (restartPolicy Never, or OnFailure
	// after a clean exit) has exited: the pod has ended.
	done *exitInfo
}

type exitInfo struct {
	code    int
	message string
}

func mustQuantity(s string) resource.Quantity { return resource.MustParse(s) }

func isExists(err error) bool { return apierrors.IsAlreadyExists(err) }

// provision binds every pending claim to a directory-backed volume and deletes released ones.
func (k *kubelet) provision(ctx context.Context) {
	pvcs, err := k.cs.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, c := range pvcs.Items {
		if c.Spec.VolumeName != "" || c.Status.Phase != corev1.ClaimPending || c.DeletionTimestamp != nil {
			continue
		}
		dir := filepath.Join(k.state, "volumes", string(c.UID))
		if err := os.MkdirAll(dir, 0o777); err != nil {
			continue
		}
		size := c.Spec.Resources.Requests[corev1.ResourceStorage]
		class := ""
		if c.Spec.StorageClassName != nil {
			class = *c.Spec.StorageClassName
		}
		pv := &corev1.PersistentVolume{
			ObjectMeta: metav1.ObjectMeta{Name: "pv-" + string(c.UID), Labels: map[string]string{"e2e.raftkv.io/provisioned": "true"}},
			Spec: corev1.PersistentVolumeSpec{
				Capacity:                      corev1.ResourceList{corev1.ResourceStorage: size},
				AccessModes:                   c.Spec.AccessModes,
				PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
				StorageClassName:              class,
				ClaimRef:                      &corev1.ObjectReference{Kind: "PersistentVolumeClaim", Namespace: c.Namespace, Name: c.Name, UID: c.UID},
				PersistentVolumeSource:        corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: dir}},
			},
		}
		if _, err := k.cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err == nil {
			log.Printf("provisioned %s for claim %s/%s", pv.Name, c.Namespace, c.Name)
		}
	}
	pvs, err := k.cs.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{LabelSelector: "e2e.raftkv.io/provisioned=true"})
	if err != nil {
		return
	}
	for _, pv := range pvs.Items {
		if pv.Status.Phase == corev1.VolumeReleased && pv.DeletionTimestamp == nil {
			if pv.Spec.HostPath != nil {
				_ = os.RemoveAll(pv.Spec.HostPath.Path)
			}
			_ = k.cs.CoreV1().PersistentVolumes().Delete(ctx, pv.Name, metav1.DeleteOptions{})
			log.Printf("deleted released volume %s", pv.Name)
		}
	}
}

// schedule binds pods nobody placed yet to this node (it is the only one).
func (k *kubelet) schedule(ctx context.Context) {
	pods, err := k.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName="})
	if err != nil {
		return
	}
	for _, p := range pods.Items {
		if p.DeletionTimestamp != nil || p.Spec.SchedulerName != corev1.DefaultSchedulerName && p.Spec.SchedulerName != "" {
			continue
		}
		b := &corev1.Binding{
			ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID},
			Target:     corev1.ObjectReference{Kind: "Node", Name: k.node},
		}
		if err := k.cs.CoreV1().Pods(p.Namespace).Bind(ctx, b, metav1.CreateOptions{}); err != nil {
			log.Printf("binding %s/%s: %v", p.Namespace, p.Name, err)
		}
	}
}

func (k *kubelet) syncPods(ctx context.Context) {
	pods, err := k.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + k.node})
	if err != nil {
		return
	}
	seen := map[string]bool{}
	for i := range pods.Items {
		p := &pods.Items[i]
		uid := string(p.UID)
		seen[uid] = true
		r := k.pods[uid]
		if p.DeletionTimestamp != nil {
			if r != nil {
				k.stop(r, p.DeletionGracePeriodSeconds)
				delete(k.pods, uid)
			}
			zero := int64(0)
			_ = k.cs.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{
				GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &p.UID},
			})
			continue
		}
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		if r == nil {
			// A re-created pod keeps its name's address (a sticky-IP CNI): clients outside the
			// pods' /etc/hosts, like the tests, can keep using it across restarts.
			name := p.Namespace + "/" + p.Name
			ip, ok := k.ips[name]
			if !ok {
				ip = fmt.Sprintf("127.0.%d.%d", 10+k.nextIP/250, 1+k.nextIP%250)
				k.nextIP++
				k.ips[name] = ip
			}
			r = &podRun{pod: p, ip: ip}
			k.pods[uid] = r
		}
		r.pod = p
		k.runPod(ctx, r)
		k.probe(r)
		k.report(ctx, r)
	}
	for uid, r := range k.pods {
		if !seen[uid] {
			k.stop(r, nil)
			delete(k.pods, uid)
		}
	}
}

func (k *kubelet) binary(image string) (string, bool) {
	name := image
	if i := strings.LastIndex(name, "/"); i >= 0 {
		name = name[i+1:]
	}
	if i := strings.IndexAny(name, ":@"); i >= 0 {
		name = name[:i]
	}
	b, ok := k.bins[name]
	return b, ok
}

func (k *kubelet) runPod(ctx context.Context, r *podRun) {
	r.mu.Lock()
	running, ended := r.cmd != nil, r.done != nil
	r.mu.Unlock()
	if running || ended || time.Now().Before(r.nextStart) {
		return
	}
	p := r.pod
	if len(p.Spec.Containers) != 1 {
		k.fail(ctx, r, "the process kubelet runs pods with exactly one container")
		return
	}
	c := p.Spec.Containers[0]
	bin, ok := k.binary(c.Image)
	if !ok {
		k.fail(ctx, r, fmt.Sprintf("no local binary for image %q", c.Image))
		return
	}
	r.dir = filepath.Join(k.state, "pods", string(p.UID))
	mounts, err := k.prepareVolumes(ctx, p, c, r.dir)
	if err != nil {
		log.Printf("pod %s/%s volumes: %v", p.Namespace, p.Name, err)
		r.nextStart = time.Now().Add(2 * time.Second)
		return
	}
	env, err := k.environment(ctx, p, c, r.ip)
	if err != nil {
		log.Printf("pod %s/%s env: %v", p.Namespace, p.Name, err)
		r.nextStart = time.Now().Add(2 * time.Second)
		return
	}
	args := append(append([]string{}, c.Command...), c.Args...)
	if len(c.Command) > 0 {
		log.Printf("pod %s/%s: container command replaced by the image's binary", p.Namespace, p.Name)
		args = c.Args
	}
	for i, a := range args {
		args[i] = expand(a, env)
	}
	// A private mount namespace: volumes and /etc/hosts appear at the pod's paths for this
	// process only.
	var script strings.Builder
	script.WriteString("set -e\n")
	for _, m := range mounts {
		fmt.Fprintf(&script, "mkdir -p %q\nmount --bind %q %q\n", m[1], m[0], m[1])
	}
	fmt.Fprintf(&script, "mount --bind %q /etc/hosts\n", k.hostsDoc)
	// The termination message file: one per pod, bind-mounted over the path the container
	// writes (the kubelet reads it back when the container exits).
	termLog := filepath.Join(r.dir, "termination-log")
	if c.TerminationMessagePath != "" {
		if err := os.MkdirAll(r.dir, 0o755); err == nil {
			_ = os.WriteFile(termLog, nil, 0o666)
			_ = os.Chmod(termLog, 0o666)
		}
		t := c.TerminationMessagePath
		fmt.Fprintf(&script, "mkdir -p %q\n[ -e %q ] || touch %q\nmount --bind %q %q\n", filepath.Dir(t), t, t, termLog, t)
	}
	script.WriteString("exec \"$@\"\n")
	logPath := filepath.Join(k.state, "logs", fmt.Sprintf("%s_%s_%s.log", p.Namespace, p.Name, p.UID))
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	cmdArgs := append([]string{"--mount", "--propagation", "private", "/bin/sh", "-c", script.String(), "sh", bin}, args...)
	cmd := exec.Command("unshare", cmdArgs...)
	cmd.Env = flatten(env)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if c.WorkingDir != "" {
		cmd.Dir = c.WorkingDir
	}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		k.fail(ctx, r, err.Error())
		return
	}
	log.Printf("started %s/%s (%s) as pid %d at %s", p.Namespace, p.Name, c.Image, cmd.Process.Pid, r.ip)
	exited := make(chan struct{})
	r.mu.Lock()
	r.cmd, r.exited, r.started, r.ready, r.failures = cmd, exited, time.Now(), false, 0
	r.mu.Unlock()
	go func() {
		err := cmd.Wait()
		logFile.Close()
		r.mu.Lock()
		defer r.mu.Unlock()
		code := cmd.ProcessState.ExitCode()
		policy := p.Spec.RestartPolicy
		if !r.stopping && (policy == corev1.RestartPolicyNever || policy == corev1.RestartPolicyOnFailure && code == 0) {
			msg, _ := os.ReadFile(termLog)
			if len(msg) > 4096 {
				msg = msg[:4096]
			}
			log.Printf("%s/%s ended with exit code %d", p.Namespace, p.Name, code)
			r.done = &exitInfo{code: code, message: string(msg)}
		} else if !r.stopping {
			log.Printf("%s/%s exited: %v", p.Namespace, p.Name, err)
			r.restarts++
			backoff := time.Duration(1<<min(r.restarts, 5)) * time.Second
			r.nextStart = time.Now().Add(backoff)
		}
		r.cmd, r.ready = nil, false
		close(exited)
	}()
}

func flatten(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// expand replaces $(VAR) references the way kubelet does; $$ escapes.
func expand(s string, env map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '$' && i+1 < len(s) {
			if s[i+1] == '$' {
				b.WriteByte('$')
				i++
				continue
			}
			if s[i+1] == '(' {
				if end := strings.IndexByte(s[i+2:], ')'); end >= 0 {
					name := s[i+2 : i+2+end]
					if v, ok := env[name]; ok {
						b.WriteString(v)
						i += end + 2
						continue
					}
				}
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (k *kubelet) stop(r *podRun, grace *int64) {
	r.mu.Lock()
	cmd, exited := r.cmd, r.exited
	r.stopping = true
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	wait := 30 * time.Second
	if grace != nil {
		wait = time.Duration(*grace) * time.Second
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(wait):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
	log.Printf("stopped %s/%s", r.pod.Namespace, r.pod.Name)
}

func (k *kubelet) stopAll() {
	for _, r := range k.pods {
		one := int64(5)
		k.stop(r, &one)
	}
}

func (k *kubelet) fail(ctx context.Context, r *podRun, why string) {
	p := r.pod.DeepCopy()
	if p.Status.Phase == corev1.PodFailed {
		return
	}
	p.Status.Phase = corev1.PodFailed
	p.Status.Message = why
	p.Status.Reason = "ProcessKubelet"
	_, _ = k.cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	log.Printf("pod %s/%s failed: %s", p.Namespace, p.Name, why)
}

// probe runs the readiness probe (and the liveness probe, restarting on failure).
func (k *kubelet) probe(r *podRun) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		r.ready = false
		return
	}
	c := r.pod.Spec.Containers[0]
	if time.Since(r.lastProbe) < time.Second {
		return
	}
	r.lastProbe = time.Now()
	if c.ReadinessProbe == nil {
		r.ready = true
	} else {
		r.ready = httpProbe(c, c.ReadinessProbe, r.ip)
	}
	if lp := c.LivenessProbe; lp != nil && time.Since(r.started) > time.Duration(lp.InitialDelaySeconds)*time.Second {
		if httpProbe(c, lp, r.ip) {
			r.failures = 0
		} else if r.failures++; r.failures >= max(lp.FailureThreshold, 1)*max(lp.PeriodSeconds, 1) {
			log.Printf("%s/%s failed its liveness probe; restarting", r.pod.Namespace, r.pod.Name)
			_ = syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
		}
	}
}

func httpProbe(c corev1.Container, p *corev1.Probe, ip string) bool {
	if p.HTTPGet == nil {
		return true
	}
	port := p.HTTPGet.Port.IntValue()
	if port == 0 {
		for _, cp := range c.Ports {
			if cp.Name == p.HTTPGet.Port.StrVal {
				port = int(cp.ContainerPort)
			}
		}
	}
	client := http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(fmt.Sprintf("http://%s:%d%s", ip, port, p.HTTPGet.Path))
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode >= 200 && resp.StatusCode < 400
}

// report writes the pod's status when it changed.
func (k *kubelet) report(ctx context.Context, r *podRun) {
	r.mu.Lock()
	running, ready, restarts, started, done := r.cmd != nil, r.ready, r.restarts, r.started, r.done
	r.mu.Unlock()
	key := fmt.Sprintf("%v/%v/%d/%v", running, ready, restarts, done != nil)
	if key == r.reported {
		return
	}
	p := r.pod.DeepCopy()
	now := metav1.Now()
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: now}
	}
	p.Status.Phase = corev1.PodRunning
	if !running && restarts == 0 {
		p.Status.Phase = corev1.PodPending
	}
	p.Status.HostIP = "127.0.0.1"
	p.Status.HostIPs = []corev1.HostIP{{IP: "127.0.0.1"}}
	p.Status.PodIP = r.ip
	p.Status.PodIPs = []corev1.PodIP{{IP: r.ip}}
	if p.Status.StartTime == nil {
		p.Status.StartTime = &now
	}
	p.Status.Conditions = []corev1.PodCondition{
		cond(corev1.PodScheduled, true), cond(corev1.PodInitialized, true),
		cond(corev1.ContainersReady, ready), cond(corev1.PodReady, ready),
	}
	c := p.Spec.Containers[0]
	cstat := corev1.ContainerStatus{
		Name: c.Name, Image: c.Image, ImageID: "local://" + c.Image, Ready: ready,
		RestartCount: restarts, Started: &running,
	}
	switch {
	case done != nil:
		reason := "Completed"
		p.Status.Phase = corev1.PodSucceeded
		if done.code != 0 {
			reason = "Error"
			p.Status.Phase = corev1.PodFailed
		}
		cstat.State.Terminated = &corev1.ContainerStateTerminated{
			ExitCode: int32(done.code), Reason: reason, Message: done.message,
			StartedAt: metav1.NewTime(started), FinishedAt: now,
		}
	case running:
		cstat.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(started)}
	default:
		cstat.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}
	}
	p.Status.ContainerStatuses = []corev1.ContainerStatus{cstat}
	if _, err := k.cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err == nil {
		r.reported = key
	}
}

// writeHosts maps every pod's DNS names (hostname.subdomain.namespace.svc) to its address.
// The file is rewritten in place so the bind mounts in running pods see the change.
func (k *kubelet) writeHosts(ctx context.Context) {
	var lines []string
	for _, r := range k.pods {
		p := r.pod
		if p.Spec.Hostname == "" {
			continue
		}
		names := []string{p.Spec.Hostname}
		if p.Spec.Subdomain != "" {
			fq := fmt.Sprintf("%s.%s.%s.svc", p.Spec.Hostname, p.Spec.Subdomain, p.Namespace)
			names = append(names, fq, fq+".cluster.local")
		}
		lines = append(lines, r.ip+" "+strings.Join(names, " "))
	}
	sort.Strings(lines)
	doc := baseHosts + strings.Join(lines, "\n") + "\n"
	if doc == k.hosts {
		return
	}
	f, err := os.OpenFile(k.hostsDoc, os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	if _, err := f.WriteString(doc); err == nil {
		k.hosts = doc
	}
}
