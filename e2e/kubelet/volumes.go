package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// prepareVolumes materializes the pod's volumes as directories and returns the
// (source, mountPath) pairs the container mounts.
func (k *kubelet) prepareVolumes(ctx context.Context, p *corev1.Pod, c corev1.Container, dir string) ([][2]string, error) {
	vdirs := map[string]string{}
	for _, v := range p.Spec.Volumes {
		d := filepath.Join(dir, "volumes", v.Name)
		switch {
		case v.PersistentVolumeClaim != nil:
			pvc, err := k.cs.CoreV1().PersistentVolumeClaims(p.Namespace).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("claim %s: %w", v.PersistentVolumeClaim.ClaimName, err)
			}
			if pvc.Spec.VolumeName == "" {
				return nil, fmt.Errorf("claim %s is not bound yet", pvc.Name)
			}
			d = filepath.Join(k.state, "volumes", string(pvc.UID))
			if err := os.MkdirAll(d, 0o777); err != nil {
				return nil, err
			}
		case v.Secret != nil:
			s, err := k.cs.CoreV1().Secrets(p.Namespace).Get(ctx, v.Secret.SecretName, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("secret %s: %w", v.Secret.SecretName, err)
			}
			if err := writeKeys(d, s.Data, v.Secret.Items); err != nil {
				return nil, err
			}
		case v.ConfigMap != nil:
			cm, err := k.cs.CoreV1().ConfigMaps(p.Namespace).Get(ctx, v.ConfigMap.Name, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("configmap %s: %w", v.ConfigMap.Name, err)
			}
			if err := writeKeys(d, stringsToBytes(cm.Data), v.ConfigMap.Items); err != nil {
				return nil, err
			}
		case v.EmptyDir != nil:
			if err := os.MkdirAll(d, 0o777); err != nil {
				return nil, err
			}
		case v.Projected != nil:
			if err := k.projected(ctx, p, v.Projected, d); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("volume %s: kind not supported by the process kubelet", v.Name)
		}
		vdirs[v.Name] = d
	}
	var mounts [][2]string
	for _, m := range c.VolumeMounts {
		src, ok := vdirs[m.Name]
		if !ok {
			return nil, fmt.Errorf("mount of unknown volume %s", m.Name)
		}
		if m.SubPath != "" {
			src = filepath.Join(src, m.SubPath)
		}
		mounts = append(mounts, [2]string{src, m.MountPath})
	}
	return mounts, nil
}

func stringsToBytes(m map[string]string) map[string][]byte {
	out := map[string][]byte{}
	for k, v := range m {
		out[k] = []byte(v)
	}
	return out
}

func writeKeys(dir string, data map[string][]byte, items []corev1.KeyToPath) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if len(items) == 0 {
		for k, v := range data {
			if err := os.WriteFile(filepath.Join(dir, k), v, 0o644); err != nil {
				return err
			}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			return fmt.Errorf("key %s missing", it.Key)
		}
		path := filepath.Join(dir, it.Path)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(path, v, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// projected writes a projected volume: service account tokens (from the TokenRequest API,
// bound to the pod), ConfigMap and Secret keys, and downward API fields.
func (k *kubelet) projected(ctx context.Context, p *corev1.Pod, v *corev1.ProjectedVolumeSource, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, s := range v.Sources {
		switch {
		case s.ServiceAccountToken != nil:
			exp := int64(3600)
			if s.ServiceAccountToken.ExpirationSeconds != nil {
				exp = *s.ServiceAccountToken.ExpirationSeconds
			}
			req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
				ExpirationSeconds: &exp,
				BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
			}}
			if s.ServiceAccountToken.Audience != "" {
				req.Spec.Audiences = []string{s.ServiceAccountToken.Audience}
			}
			sa := p.Spec.ServiceAccountName
			if sa == "" {
				sa = "default"
			}
			tok, err := k.cs.CoreV1().ServiceAccounts(p.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
			if err != nil {
				return fmt.Errorf("token for service account %s: %w", sa, err)
			}
			if err := os.WriteFile(filepath.Join(dir, s.ServiceAccountToken.Path), []byte(tok.Status.Token), 0o644); err != nil {
				return err
			}
		case s.ConfigMap != nil:
			cm, err := k.cs.CoreV1().ConfigMaps(p.Namespace).Get(ctx, s.ConfigMap.Name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("configmap %s: %w", s.ConfigMap.Name, err)
			}
			if err := writeKeys(dir, stringsToBytes(cm.Data), s.ConfigMap.Items); err != nil {
				return err
			}
		case s.Secret != nil:
			sec, err := k.cs.CoreV1().Secrets(p.Namespace).Get(ctx, s.Secret.Name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("secret %s: %w", s.Secret.Name, err)
			}
			if err := writeKeys(dir, sec.Data, s.Secret.Items); err != nil {
				return err
			}
		case s.DownwardAPI != nil:
			for _, it := range s.DownwardAPI.Items {
				if it.FieldRef == nil {
					continue
				}
				if err := os.WriteFile(filepath.Join(dir, it.Path), []byte(fieldValue(p, it.FieldRef.FieldPath, "")), 0o644); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func fieldValue(p *corev1.Pod, path, ip string) string {
	switch path {
	case "metadata.name":
		return p.Name
	case "metadata.namespace":
		return p.Namespace
	case "metadata.uid":
		return string(p.UID)
	case "status.podIP":
		return ip
	case "status.hostIP":
		return "127.0.0.1"
	case "spec.nodeName":
		return p.Spec.NodeName
	case "spec.serviceAccountName":
		return p.Spec.ServiceAccountName
	}
	return ""
}

// environment is the container's environment: what kubelet sets for the API server, then
// envFrom, then env (with $(VAR) references to earlier variables expanded).
func (k *kubelet) environment(ctx context.Context, p *corev1.Pod, c corev1.Container, ip string) (map[string]string, error) {
	env := map[string]string{
		"PATH":                          "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOSTNAME":                      p.Name,
		"KUBERNETES_SERVICE_HOST":       k.apiHost,
		"KUBERNETES_SERVICE_PORT":       k.apiPort,
		"KUBERNETES_SERVICE_PORT_HTTPS": k.apiPort,
	}
	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			cm, err := k.cs.CoreV1().ConfigMaps(p.Namespace).Get(ctx, from.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				if from.ConfigMapRef.Optional != nil && *from.ConfigMapRef.Optional {
					continue
				}
				return nil, fmt.Errorf("configmap %s: %w", from.ConfigMapRef.Name, err)
			}
			for k, v := range cm.Data {
				env[from.Prefix+k] = v
			}
		case from.SecretRef != nil:
			s, err := k.cs.CoreV1().Secrets(p.Namespace).Get(ctx, from.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				if from.SecretRef.Optional != nil && *from.SecretRef.Optional {
					continue
				}
				return nil, fmt.Errorf("secret %s: %w", from.SecretRef.Name, err)
			}
			for k, v := range s.Data {
				env[from.Prefix+k] = string(v)
			}
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = expand(e.Value, env)
		case e.ValueFrom.FieldRef != nil:
			env[e.Name] = fieldValue(p, e.ValueFrom.FieldRef.FieldPath, ip)
		case e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			s, err := k.cs.CoreV1().Secrets(p.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("secret %s: %w", ref.Name, err)
			}
			env[e.Name] = string(s.Data[ref.Key])
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			cm, err := k.cs.CoreV1().ConfigMaps(p.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("configmap %s: %w", ref.Name, err)
			}
			env[e.Name] = cm.Data[ref.Key]
		}
	}
	return env, nil
}
