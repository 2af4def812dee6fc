{{/* Names -------------------------------------------------------------------------------- */}}

{{- define "phlora-nim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix; component suffixes add at most 16 characters. */}}
{{- define "phlora-nim.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "phlora-nim.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* How the GPU pods serve: "llmapi" (backend trtllm: TensorRT-LLM ≥ 1.3's llmapi Python model),
     "legacy" (trtllm-legacy / tensorrtllm: compiled engines, the C++ tensorrtllm backend), "nim" or "vllm". */}}
{{- define "phlora-nim.engineMode" -}}
{{- if eq .Values.backend "nim" }}nim{{ else if eq .Values.backend "vllm" }}vllm{{ else if eq .Values.backend "trtllm" }}llmapi{{ else }}legacy{{ end }}
{{- end }}

{{/* The Triton model the router forwards to: router.upstreamModel, else the engine's own. */}}
{{- define "phlora-nim.upstreamModel" -}}
{{- if .Values.router.upstreamModel }}{{ .Values.router.upstreamModel }}{{ else if eq (include "phlora-nim.engineMode" .) "llmapi" }}tensorrt_llm{{ else }}ensemble{{ end }}
{{- end }}

{{/* The GPU component: "triton", "nim" or "vllm". */}}
{{- define "phlora-nim.serverComponent" -}}
{{- if eq .Values.backend "nim" }}nim{{ else if eq .Values.backend "vllm" }}vllm{{ else }}triton{{ end }}
{{- end }}

{{/* "true" when the GPU pods speak the OpenAI API (NIM, vLLM): the router reaches them over HTTP. */}}
{{- define "phlora-nim.openaiBackend" -}}
{{- if has .Values.backend (list "nim" "vllm") }}true{{ end }}
{{- end }}

{{/* The HTTP port of OpenAI-speaking GPU pods. */}}
{{- define "phlora-nim.openaiPort" -}}
{{- if eq .Values.backend "nim" }}{{ .Values.nim.port }}{{ else }}{{ .Values.vllm.port }}{{ end }}
{{- end }}

{{- define "phlora-nim.serverName" -}}
{{ include "phlora-nim.fullname" . }}-{{ include "phlora-nim.serverComponent" . }}
{{- end }}

{{- define "phlora-nim.routerName" -}}
{{ include "phlora-nim.fullname" . }}-router
{{- end }}

{{/* Headless Service of the GPU replicas: the router resolves it to every ready pod. */}}
{{- define "phlora-nim.tritonHeadlessName" -}}
{{ include "phlora-nim.fullname" . }}-{{ include "phlora-nim.serverComponent" . }}-headless
{{- end }}

{{/* The router's --upstream-dns: Triton's gRPC port, or the OpenAI-speaking pods' HTTP port. */}}
{{- define "phlora-nim.upstreamDns" -}}
{{- $port := ternary (include "phlora-nim.openaiPort" .) (toString .Values.triton.ports.grpc) (eq (include "phlora-nim.openaiBackend" .) "true") }}
{{- include "phlora-nim.tritonHeadlessName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ $port }}
{{- end }}

{{- define "phlora-nim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "phlora-nim.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------- */}}

{{/* Selector labels; call with (dict "ctx" $ "component" "router"). */}}
{{- define "phlora-nim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "phlora-nim.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "phlora-nim.labels" -}}
helm.sh/chart: {{ include "phlora-nim.chart" .ctx }}
{{ include "phlora-nim.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: phlora-nim
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Images ------------------------------------------------------------------------------- */}}

{{/* (dict "image" .Values.x.image "default" "tag-if-empty") */}}
{{- define "phlora-nim.image" -}}
{{- $repository := required "an image repository is required" .image.repository }}
{{- printf "%s:%s" $repository (default .default .image.tag | toString) }}
{{- end }}

{{- define "phlora-nim.routerImage" -}}
{{ include "phlora-nim.image" (dict "image" .Values.router.image "default" .Chart.AppVersion) }}
{{- end }}

{{/* An image block that falls back to the router image when its repository is empty. */}}
{{- define "phlora-nim.imageOrRouter" -}}
{{- if .image.repository }}
{{- include "phlora-nim.image" (dict "image" .image "default" .ctx.Chart.AppVersion) }}
{{- else }}
{{- include "phlora-nim.routerImage" .ctx }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by every pod: pull secrets. Call as (include ... | trim) under `with`. */}}
{{- define "phlora-nim.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Security ----------------------------------------------------------------------------- */}}

{{/* (dict "runAsUser" 1000 "runAsGroup" 1000 "fsGroup" 1000) */}}
{{- define "phlora-nim.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .runAsUser }}
  runAsGroup: {{ .runAsGroup }}
  fsGroup: {{ .fsGroup }}
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* (dict "readOnlyRootFilesystem" true) */}}
{{- define "phlora-nim.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: {{ .readOnlyRootFilesystem }}
  runAsNonRoot: true
  capabilities:
    drop:
      - ALL
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* Probes ------------------------------------------------------------------------------- */}}

{{- define "phlora-nim.probeTiming" -}}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end }}

{{/* Resources ---------------------------------------------------------------------------- */}}

{{/* CPU/memory from values plus the GPU resource in limits and requests.
     (dict "resources" .resources "gpu" .gpu) */}}
{{- define "phlora-nim.gpuResources" -}}
{{- $resources := deepCopy (default dict .resources) }}
{{- $gpu := dict .gpu.resourceName (.gpu.count | int) }}
{{- $_ := set $resources "limits" (merge (default dict $resources.limits) $gpu) }}
{{- $_ := set $resources "requests" (merge (default dict $resources.requests) $gpu) -}}
resources:
  {{- toYaml $resources | nindent 2 }}
{{- end }}

{{/* Model repository ---------------------------------------------------------------------- */}}

{{- define "phlora-nim.repositoryClaimName" -}}
{{- default (printf "%s-model-repository" (include "phlora-nim.fullname" .)) .Values.modelRepository.pvc.existingClaim }}
{{- end }}

{{/* The model-repository volume of a serving pod: read-only claim, or an emptyDir to fill. */}}
{{- define "phlora-nim.repositoryVolume" -}}
- name: model-repository
{{- if eq .Values.modelRepository.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "phlora-nim.repositoryClaimName" . }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelRepository.emptyDirSizeLimit }}
{{- end }}
{{- end }}

{{- define "phlora-nim.repositoryMount" -}}
- name: model-repository
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
{{- end }}

{{/* Init containers that fill (image, url) or wait for (pvc) the repository.
     (dict "ctx" $ "image" "<image of the main container>" "pullPolicy" "..." "readOnlyRootFilesystem" true) */}}
{{- define "phlora-nim.repositoryInitContainers" -}}
{{- $v := .ctx.Values.modelRepository }}
{{- $registry := printf "%s/phlora_registry.json" $v.mountPath }}
{{- if eq $v.source "image" }}
- name: fill-model-repository
  image: {{ include "phlora-nim.image" (dict "image" $v.image "default" "latest") | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command: ["cp", "-R", "{{ trimSuffix "/" $v.image.path }}/.", "{{ $v.mountPath }}/"]
  {{- include "phlora-nim.containerSecurityContext" (dict "readOnlyRootFilesystem" true) | nindent 2 }}
  volumeMounts:
    - name: model-repository
      mountPath: {{ $v.mountPath }}
{{- else if eq $v.source "url" }}
- name: fill-model-repository
  image: {{ include "phlora-nim.routerImage" .ctx | quote }}
  imagePullPolicy: {{ .ctx.Values.router.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import hashlib, os, sys, tarfile, tempfile, urllib.request
      url, expected, dest = os.environ["REPOSITORY_URL"], os.environ["REPOSITORY_SHA256"], sys.argv[1]
      digest = hashlib.sha256()
      with tempfile.TemporaryFile(dir=dest) as archive:
          with urllib.request.urlopen(url, timeout=60) as response:
              for chunk in iter(lambda: response.read(1 << 20), b""):
                  digest.update(chunk)
                  archive.write(chunk)
          if expected and digest.hexdigest() != expected.lower():
              sys.exit(f"{url}: sha256 {digest.hexdigest()}, expected {expected}: refusing to unpack it")
          archive.seek(0)
          with tarfile.open(fileobj=archive, mode="r:*") as tar:
              tar.extractall(dest, filter="data")
      print(f"model repository unpacked from {url} into {dest}")
    - {{ $v.mountPath | quote }}
  env:
    - name: REPOSITORY_URL
      value: {{ $v.url.location | quote }}
    - name: REPOSITORY_SHA256
      value: {{ $v.url.sha256 | quote }}
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
  {{- include "phlora-nim.containerSecurityContext" (dict "readOnlyRootFilesystem" true) | nindent 2 }}
  volumeMounts:
    - name: model-repository
      mountPath: {{ $v.mountPath }}
{{- else if $v.waitForRegistry }}
- name: wait-for-registry
  image: {{ .image | quote }}
  imagePullPolicy: {{ .pullPolicy }}
  command:
    - sh
    - -c
    - until [ -f "$0" ]; do echo "waiting for $0 (phlora-nim convert)"; sleep 10; done
    - {{ $registry | quote }}
  {{- include "phlora-nim.containerSecurityContext" (dict "readOnlyRootFilesystem" true) | nindent 2 }}
  volumeMounts:
    {{- include "phlora-nim.repositoryMount" .ctx | nindent 4 }}
{{- end }}
{{- end }}

{{/* Shared pod scheduling fields of a component values block. */}}
{{- define "phlora-nim.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Objects shared by router and server ---------------------------------------------------- */}}

{{/* HorizontalPodAutoscaler. (dict "ctx" $ "component" "router" "name" "..." "autoscaling" .. "resources" ..) */}}
{{- define "phlora-nim.hpa" -}}
{{- $a := .autoscaling }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "phlora-nim.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .name }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- if not (kindIs "invalid" $a.targetCPUUtilizationPercentage) }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- end }}
    {{- if $a.podsMetric.name }}
    - type: Pods
      pods:
        metric:
          name: {{ $a.podsMetric.name }}
        target:
          type: AverageValue
          averageValue: {{ $a.podsMetric.averageValue | quote }}
    {{- end }}
{{- end }}

{{/* PodDisruptionBudget. (dict "ctx" $ "component" "router" "name" "..." "pdb" ..) */}}
{{- define "phlora-nim.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "phlora-nim.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
spec:
  maxUnavailable: {{ .pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "phlora-nim.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
{{- end }}

{{/* ServiceMonitor endpoint scraping. (dict "ctx" $ "component" .. "name" .. "port" .. "path" ..) */}}
{{- define "phlora-nim.serviceMonitor" -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "phlora-nim.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
    {{- with .ctx.Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "phlora-nim.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ .ctx.Release.Namespace }}
  endpoints:
    - port: {{ .port }}
      path: {{ .path }}
      interval: {{ .ctx.Values.metrics.serviceMonitor.interval }}
{{- end }}

{{/* A `helm test` pod running files/release_check.py. (dict "ctx" $ "check" "health" "target" "host:port") */}}
{{- define "phlora-nim.testPod" -}}
{{- $v := .ctx.Values }}
{{- $tls := and $v.router.enabled $v.router.tls.existingSecret }}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "phlora-nim.fullname" .ctx }}-test-{{ .check }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "phlora-nim.labels" (dict "ctx" .ctx "component" "test") | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "phlora-nim.serviceAccountName" .ctx }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with include "phlora-nim.imagePullSecrets" .ctx | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- include "phlora-nim.podSecurityContext" $v.router | nindent 2 }}
  containers:
    - name: {{ .check }}
      image: {{ include "phlora-nim.imageOrRouter" (dict "ctx" .ctx "image" $v.tests.image) | quote }}
      imagePullPolicy: {{ $v.tests.image.pullPolicy }}
      command:
        - python
        - /opt/release-check/release_check.py
        - {{ .check }}
      env:
        - name: TARGET
          value: {{ .target | quote }}
        - name: MODEL
          value: {{ ternary (default (include "phlora-nim.upstreamModel" .ctx) $v.tests.model) $v.tests.model (eq .check "infer") | quote }}
        - name: ENGINE_INPUTS
          value: {{ ternary "llmapi" "ensemble" (eq (include "phlora-nim.engineMode" .ctx) "llmapi") | quote }}
        - name: PROMPT
          value: {{ $v.tests.prompt | quote }}
        - name: MAX_TOKENS
          value: {{ $v.tests.maxTokens | quote }}
        - name: TIMEOUT_SECONDS
          value: {{ $v.tests.timeoutSeconds | quote }}
        - name: PYTHONDONTWRITEBYTECODE
          value: "1"
        - name: HOME
          value: /tmp
        {{- if $tls }}
        - name: CA_FILE
          value: /etc/phlora-nim/tls/{{ $v.router.tls.caKey }}
        {{- end }}
        {{- with $v.tests.apiKeySecret.name }}
        - name: API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $v.tests.apiKeySecret.key }}
        {{- end }}
      resources:
        requests:
          cpu: 100m
          memory: 256Mi
        limits:
          memory: 512Mi
      {{- include "phlora-nim.containerSecurityContext" (dict "readOnlyRootFilesystem" true) | nindent 6 }}
      volumeMounts:
        - name: release-check
          mountPath: /opt/release-check
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if $tls }}
        - name: tls
          mountPath: /etc/phlora-nim/tls
          readOnly: true
        {{- end }}
  volumes:
    - name: release-check
      configMap:
        name: {{ include "phlora-nim.fullname" .ctx }}-release-check
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if $tls }}
    - name: tls
      secret:
        secretName: {{ $v.router.tls.existingSecret }}
    {{- end }}
{{- end }}
