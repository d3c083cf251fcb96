{{/* The chart's name, or nameOverride. */}}
{{- define "chatmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: <release>-<chart>, or the release alone if it contains the chart name. */}}
{{- define "chatmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The chatmesh processes, in the order callers come before callees. */}}
{{- define "chatmesh.processes" -}}
{{- $names := list "gateway" "dialogue" "safety" "cache" }}
{{- if .Values.modelsim.enabled }}{{ $names = append $names "modelsim" }}{{ end }}
{{- toJson $names }}
{{- end }}

{{/* The name of a process's resources: dict "root" $ "process" "gateway". */}}
{{- define "chatmesh.componentName" -}}
{{- printf "%s-%s" (include "chatmesh.fullname" .root | trunc 54 | trimSuffix "-") .process }}
{{- end }}

{{- define "chatmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "chatmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatmesh
{{- end }}

{{/* The labels that select a process's pods: dict "root" $ "process" "gateway". */}}
{{- define "chatmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .process }}
{{- end }}

{{- define "chatmesh.componentLabels" -}}
{{ include "chatmesh.labels" .root }}
app.kubernetes.io/component: {{ .process }}
{{- end }}

{{- define "chatmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatmesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chatmesh.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* A process's in-cluster address as a gRPC target: dns:///<service FQDN>:<port>, resolved to every ready pod. */}}
{{- define "chatmesh.target" -}}
{{- $values := index .root.Values .process }}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "chatmesh.componentName" .) .root.Release.Namespace .root.Values.clusterDomain (int $values.port) }}
{{- end }}

{{/* The model's base URL: model.baseUrl, else modelsim's Service when it runs, else empty (OpenAI's). */}}
{{- define "chatmesh.modelBaseUrl" -}}
{{- if .Values.model.baseUrl }}
{{- .Values.model.baseUrl }}
{{- else if .Values.modelsim.enabled }}
{{- printf "http://%s.%s.svc.%s:%d/v1" (include "chatmesh.componentName" (dict "root" . "process" "modelsim")) .Release.Namespace .Values.clusterDomain (int .Values.modelsim.port) }}
{{- end }}
{{- end }}

{{/* The processes that call the model provider, as JSON: dialogue (chat) and safety (moderation), and the cache
(embeddings) when the semantic cache is on. Each gets the API key, the deployments file with its keys' Secret, and a
way to the model (networkPolicy.modelEgress, or modelsim's ingress). */}}
{{- define "chatmesh.modelCallers" -}}
{{- $callers := list "dialogue" "safety" }}
{{- if .Values.cache.semantic.enabled }}{{ $callers = append $callers "cache" }}{{ end }}
{{- toJson $callers }}
{{- end }}

{{/* Whether chatmesh is given an API key (the chart's Secret or an existing one). */}}
{{- define "chatmesh.hasApiKey" -}}
{{- if or .Values.model.existingSecret .Values.model.apiKey }}true{{ end }}
{{- end }}

{{/* Where CHATMESH_REDIS_URL, the data Redis, comes from: "existing", "chart" or "bundled". Redis is required: the
gateway keeps tenants, API keys and limits there, dialogue its conversations, shared by every replica. */}}
{{- define "chatmesh.redisSource" -}}
{{- if .Values.redis.existingSecret }}existing
{{- else if .Values.redis.url }}chart
{{- else if .Values.redis.bundled.enabled }}bundled
{{- else }}
{{- fail "redis: chatmesh requires Redis: the gateway keeps tenants, API keys and limits there, and dialogue its conversations, so that every replica sees them. Without it, a second dialogue replica would not see the first one's conversations: turn 2 landing on another replica gets NOT_FOUND. Set redis.url or redis.existingSecret to your Redis, or redis.bundled.enabled=true (a persistent single-replica Redis)" }}
{{- end }}
{{- end }}

{{/* Where CHATMESH_CACHE_REDIS_URL, the answer cache's Redis (which may evict), comes from: "existing", "chart",
"bundled", or "data" when there is none of its own (the cache then uses the data Redis). */}}
{{- define "chatmesh.cacheRedisSource" -}}
{{- $c := .Values.redis.cache }}
{{- if $c.existingSecret }}existing
{{- else if $c.url }}chart
{{- else if $c.bundled.enabled }}bundled
{{- else }}data
{{- end }}
{{- end }}

{{/* The Redis a process uses, as JSON: "url" (its variable), "key" (its key in the chart's Secret), "source" (as
above), "values" (redis or redis.cache), and "name" and "component" (the bundled one's Service and pods); empty for processes without Redis: dict "root" $ "process" "cache". */}}
{{- define "chatmesh.processRedis" -}}
{{- $root := .root }}
{{- if has .process (list "gateway" "dialogue") }}
{{- toJson (dict "url" "CHATMESH_REDIS_URL" "key" "CHATMESH_REDIS_URL" "source" (include "chatmesh.redisSource" $root) "values" $root.Values.redis "name" (include "chatmesh.redisName" $root) "component" "redis") }}
{{- else if eq .process "cache" }}
{{- $source := include "chatmesh.cacheRedisSource" $root }}
{{- if eq $source "data" }}
{{- toJson (dict "url" "CHATMESH_CACHE_REDIS_URL" "key" "CHATMESH_REDIS_URL" "source" (include "chatmesh.redisSource" $root) "values" $root.Values.redis "name" (include "chatmesh.redisName" $root) "component" "redis") }}
{{- else }}
{{- toJson (dict "url" "CHATMESH_CACHE_REDIS_URL" "key" "CHATMESH_CACHE_REDIS_URL" "source" $source "values" $root.Values.redis.cache "name" (include "chatmesh.cacheRedisName" $root) "component" "cache-redis") }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret with the bundled Redises' password (key "password"). */}}
{{- define "chatmesh.redisPasswordSecretName" -}}
{{- printf "%s-redis-auth" (include "chatmesh.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{/* Whether a bundled Redis runs. */}}
{{- define "chatmesh.anyBundledRedis" -}}
{{- if or (eq (include "chatmesh.redisSource" .) "bundled") (eq (include "chatmesh.cacheRedisSource" .) "bundled") }}true{{ end }}
{{- end }}

{{/* The bundled Redises' password, base64: as the Secret already in the cluster holds it (kept across upgrades),
else 48 random characters. */}}
{{- define "chatmesh.redisPassword" -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "chatmesh.redisPasswordSecretName" .)).data | default dict }}
{{- index $existing "password" | default (randAlphaNum 48 | b64enc) }}
{{- end }}

{{/* The Secret with the admin token and the API key pepper: auth.existingSecret, or the chart's own. */}}
{{- define "chatmesh.authSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-auth" (include "chatmesh.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The data of the chart's auth Secret, as JSON (base64 values): each value as given, else as the Secret
already in the cluster holds it (so that upgrades keep it), else 48 random characters. lookup finds nothing
without a cluster (helm template, --dry-run), and then new values are generated. */}}
{{- define "chatmesh.authSecretData" -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "chatmesh.authSecretName" .)).data | default dict }}
{{- $data := dict }}
{{- range $key, $given := dict "CHATMESH_ADMIN_TOKEN" .Values.auth.adminToken "CHATMESH_API_KEY_PEPPER" .Values.auth.apiKeyPepper }}
{{- if $given }}
{{- $_ := set $data $key ($given | b64enc) }}
{{- else if index $existing $key }}
{{- $_ := set $data $key (index $existing $key) }}
{{- else }}
{{- $_ := set $data $key (randAlphaNum 48 | b64enc) }}
{{- end }}
{{- end }}
{{- toJson $data }}
{{- end }}

{{/* Whether the chart creates its Secret. */}}
{{- define "chatmesh.createSecret" -}}
{{- if or (and .Values.model.apiKey (not .Values.model.existingSecret)) (eq (include "chatmesh.redisSource" .) "chart") (eq (include "chatmesh.cacheRedisSource" .) "chart") (and .Values.logging.userIdSalt (not .Values.logging.existingSecret)) }}true{{ end }}
{{- end }}

{{- define "chatmesh.redisName" -}}
{{- printf "%s-redis" (include "chatmesh.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* The env entries of secrets a process uses: dict "root" $ "process" "dialogue". */}}
{{- define "chatmesh.secretEnv" -}}
{{- $root := .root }}
{{- if ne .process "modelsim" }}
{{- if $root.Values.logging.existingSecret }}
- name: CHATMESH_LOG_USER_ID_SALT
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.logging.existingSecret }}
      key: {{ $root.Values.logging.existingSecretKey }}
{{- else if $root.Values.logging.userIdSalt }}
- name: CHATMESH_LOG_USER_ID_SALT
  valueFrom:
    secretKeyRef:
      name: {{ include "chatmesh.fullname" $root }}
      key: CHATMESH_LOG_USER_ID_SALT
{{- end }}
{{- end }}
{{- if has .process (include "chatmesh.modelCallers" $root | fromJsonArray) }}
{{- if $root.Values.model.existingSecret }}
- name: OPENAI_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.model.existingSecret }}
      key: {{ $root.Values.model.existingSecretKey }}
{{- else if $root.Values.model.apiKey }}
- name: OPENAI_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "chatmesh.fullname" $root }}
      key: OPENAI_API_KEY
{{- end }}
{{- end }}
{{- if eq .process "gateway" }}
- name: CHATMESH_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "chatmesh.authSecretName" $root }}
      key: {{ ternary $root.Values.auth.existingSecretAdminTokenKey "CHATMESH_ADMIN_TOKEN" (not (empty $root.Values.auth.existingSecret)) }}
- name: CHATMESH_API_KEY_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ include "chatmesh.authSecretName" $root }}
      key: {{ ternary $root.Values.auth.existingSecretPepperKey "CHATMESH_API_KEY_PEPPER" (not (empty $root.Values.auth.existingSecret)) }}
{{- end }}
{{- with include "chatmesh.processRedis" . }}
{{- $redis := fromJson . }}
{{- $values := $redis.values }}
{{- if eq $redis.source "existing" }}
- name: {{ $redis.url }}
  valueFrom:
    secretKeyRef:
      name: {{ $values.existingSecret }}
      key: {{ $values.existingSecretKey }}
{{- with $values.existingSecretUsernameKey }}
- name: CHATMESH_REDIS_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $values.existingSecret }}
      key: {{ . }}
{{- end }}
{{- with $values.existingSecretPasswordKey }}
- name: CHATMESH_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $values.existingSecret }}
      key: {{ . }}
{{- end }}
{{- else if eq $redis.source "chart" }}
- name: {{ $redis.url }}
  valueFrom:
    secretKeyRef:
      name: {{ include "chatmesh.fullname" $root }}
      key: {{ $redis.key }}
{{- else if eq $redis.source "bundled" }}
- name: {{ $redis.url }}
  value: {{ printf "%s://%s.%s.svc.%s:6379/0" (ternary "rediss" "redis" (not (empty (include "chatmesh.tlsSource" $root)))) $redis.name $root.Release.Namespace $root.Values.clusterDomain | quote }}
- name: CHATMESH_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "chatmesh.redisPasswordSecretName" $root }}
      key: password
{{- if include "chatmesh.tlsSource" $root }}
# The bundled Redis serves the internal certificate.
- name: CHATMESH_REDIS_TLS_CA_FILE
  value: /etc/chatmesh/tls/ca.crt
{{- end }}
{{- end }}
{{- if include "chatmesh.externalRedisTls" $ }}
- name: CHATMESH_REDIS_TLS_CA_FILE
  value: /etc/chatmesh/redis-tls/ca.crt
{{- if $root.Values.redis.tls.clientCertificate }}
- name: CHATMESH_REDIS_TLS_CERT_FILE
  value: /etc/chatmesh/redis-tls/tls.crt
- name: CHATMESH_REDIS_TLS_KEY_FILE
  value: /etc/chatmesh/redis-tls/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A process container's env entries (besides the settings ConfigMap): dict "root" $ "process" "safety". */}}
{{- define "chatmesh.containerEnv" -}}
{{- $root := .root }}
{{- $process := .process }}
{{- $v := index $root.Values $process }}
{{- if $root.Values.tracing.otlpEndpoint }}
# Where a span comes from, in the OpenTelemetry resource.
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),k8s.deployment.name={{ include "chatmesh.componentName" . }}"
{{- end }}
{{- include "chatmesh.secretEnv" . }}
{{- if ne $process "modelsim" }}
{{- include "chatmesh.tlsEnv" . }}
{{- end }}
{{- if eq $process "safety" }}
- name: CHATMESH_SAFETY_KEYWORDS
  value: /etc/chatmesh/keywords
- name: CHATMESH_SAFETY_KEYWORDS_RELOAD_SECONDS
  value: {{ $v.keywords.reloadSeconds | toString | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* TLS: where the internal certificate (every gRPC port, the channels between processes, and the bundled Redises)
comes from: "existing" (tls.existingSecret), "certManager" (a Certificate the chart creates) or "generated" (the
chart's own CA, kept across upgrades); empty when tls.enabled is false. */}}
{{- define "chatmesh.tlsSource" -}}
{{- if .Values.tls.enabled }}
{{- if .Values.tls.existingSecret }}existing
{{- else if .Values.tls.certManager.enabled }}
{{- if not .Values.tls.certManager.issuerRef.name }}
{{- fail "tls.certManager.enabled: set tls.certManager.issuerRef.name to the cert-manager Issuer or ClusterIssuer that signs chatmesh's internal certificate" }}
{{- end }}certManager
{{- else }}generated
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret with the internal certificate: tls.crt, tls.key and ca.crt. */}}
{{- define "chatmesh.tlsSecretName" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "chatmesh.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The Secret with the chart's generated CA (tls.crt, tls.key), never mounted: it signs the internal certificate
again when the names it must carry change. */}}
{{- define "chatmesh.caSecretName" -}}
{{- printf "%s-ca" (include "chatmesh.fullname" . | trunc 60 | trimSuffix "-") }}
{{- end }}

{{/* Where the public gateway port's certificate comes from: "existing", "certManager", or empty (the internal one). */}}
{{- define "chatmesh.gatewayTlsSource" -}}
{{- if .Values.tls.enabled }}
{{- $g := .Values.tls.gateway }}
{{- if $g.existingSecret }}existing
{{- else if $g.certManager.enabled }}
{{- if not $g.certManager.issuerRef.name }}
{{- fail "tls.gateway.certManager.enabled: set tls.gateway.certManager.issuerRef.name to the Issuer or ClusterIssuer of the gateway's public certificate" }}
{{- end }}
{{- if not $g.certManager.dnsNames }}
{{- fail "tls.gateway.certManager.enabled: set tls.gateway.certManager.dnsNames to the names callers dial the gateway by" }}
{{- end }}certManager
{{- end }}
{{- end }}
{{- end }}

{{- define "chatmesh.gatewayTlsSecretName" -}}
{{- if .Values.tls.gateway.existingSecret }}
{{- .Values.tls.gateway.existingSecret }}
{{- else }}
{{- printf "%s-gateway-tls" (include "chatmesh.fullname" . | trunc 51 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* A Service's DNS names, as clients dial them: dict "root" $ "name" "chatmesh-dialogue". */}}
{{- define "chatmesh.serviceDnsNames" -}}
{{- $ns := .root.Release.Namespace }}
{{- toJson (list (printf "%s.%s.svc.%s" .name $ns .root.Values.clusterDomain) (printf "%s.%s.svc" .name $ns) (printf "%s.%s" .name $ns) .name) }}
{{- end }}

{{/* The DNS names the internal certificate carries: every chatmesh process's Service, and the bundled Redises'
(which serve it too), as JSON. */}}
{{- define "chatmesh.tlsDnsNames" -}}
{{- $root := . }}
{{- $names := list }}
{{- range $process := list "gateway" "dialogue" "safety" "cache" }}
{{- $names = concat $names (include "chatmesh.serviceDnsNames" (dict "root" $root "name" (include "chatmesh.componentName" (dict "root" $root "process" $process))) | fromJsonArray) }}
{{- end }}
{{- if eq (include "chatmesh.redisSource" .) "bundled" }}
{{- $names = concat $names (include "chatmesh.serviceDnsNames" (dict "root" $root "name" (include "chatmesh.redisName" .)) | fromJsonArray) }}
{{- end }}
{{- if eq (include "chatmesh.cacheRedisSource" .) "bundled" }}
{{- $names = concat $names (include "chatmesh.serviceDnsNames" (dict "root" $root "name" (include "chatmesh.cacheRedisName" .)) | fromJsonArray) }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* The chart's generated CA and internal certificate, as JSON: "ca" {tls.crt, tls.key} and "tls" {tls.crt, tls.key,
ca.crt}, base64, and "names", the digest of the DNS names the certificate was made for. The CA is kept across
upgrades (lookup); so is the certificate, unless the names it must carry changed: then the kept CA signs a new one,
which every process already trusts. lookup finds nothing offline (helm template), and then both are new. */}}
{{- define "chatmesh.generatedTls" -}}
{{- $days := int .Values.tls.generated.validityDays }}
{{- $names := include "chatmesh.tlsDnsNames" . | fromJsonArray }}
{{- $digest := $names | join "," | sha256sum | trunc 32 }}
{{- $keptCa := (lookup "v1" "Secret" .Release.Namespace (include "chatmesh.caSecretName" .)).data | default dict }}
{{- $keptTls := lookup "v1" "Secret" .Release.Namespace (include "chatmesh.tlsSecretName" .) | default dict }}
{{- $ca := dict }}
{{- $fresh := true }}
{{- if and (index $keptCa "tls.crt") (index $keptCa "tls.key") }}
{{- $ca = buildCustomCert (index $keptCa "tls.crt") (index $keptCa "tls.key") }}
{{- $fresh = false }}
{{- else }}
{{- $ca = genCA (printf "%s-ca" (include "chatmesh.fullname" .)) $days }}
{{- end }}
{{- $caData := dict "tls.crt" ($ca.Cert | b64enc) "tls.key" ($ca.Key | b64enc) }}
{{- $tlsData := dict }}
{{- $keptData := get $keptTls "data" | default dict }}
{{- $keptDigest := get ((get $keptTls "metadata" | default dict).annotations | default dict) "chatmesh.io/dns-names" }}
{{- if and (not $fresh) (index $keptData "tls.crt") (eq $keptDigest $digest) (eq (index $keptData "ca.crt") (index $caData "tls.crt")) }}
{{- $tlsData = $keptData }}
{{- else }}
{{- $cert := genSignedCert (include "chatmesh.fullname" .) nil $names $days $ca }}
{{- $tlsData = dict "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) "ca.crt" (index $caData "tls.crt") }}
{{- end }}
{{- toJson (dict "ca" $caData "tls" $tlsData "names" $digest) }}
{{- end }}

{{/* The TLS env entries of a chatmesh process (and the Redis CA when its Redis is the bundled one over TLS):
dict "root" $ "process" "gateway". */}}
{{- define "chatmesh.tlsEnv" -}}
{{- $root := .root }}
{{- if include "chatmesh.tlsSource" $root }}
- name: CHATMESH_TLS_CERT_FILE
  value: /etc/chatmesh/tls/tls.crt
- name: CHATMESH_TLS_KEY_FILE
  value: /etc/chatmesh/tls/tls.key
- name: CHATMESH_TLS_CA_FILE
  value: /etc/chatmesh/tls/ca.crt
- name: CHATMESH_TLS_RELOAD_SECONDS
  value: {{ $root.Values.tls.reloadSeconds | toString | quote }}
{{- if and (eq .process "gateway") (include "chatmesh.gatewayTlsSource" $root) }}
- name: CHATMESH_GATEWAY_TLS_CERT_FILE
  value: /etc/chatmesh/gateway-tls/tls.crt
- name: CHATMESH_GATEWAY_TLS_KEY_FILE
  value: /etc/chatmesh/gateway-tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{- define "chatmesh.cacheRedisName" -}}
{{- printf "%s-cache-redis" (include "chatmesh.fullname" . | trunc 51 | trimSuffix "-") }}
{{- end }}

{{/* Whether a process reaches an external Redis with the CA (and client certificate) of redis.tls.existingSecret:
dict "root" $ "process" "cache". */}}
{{- define "chatmesh.externalRedisTls" -}}
{{- with include "chatmesh.processRedis" . }}
{{- if and (ne (fromJson .).source "bundled") $.root.Values.redis.tls.existingSecret }}true{{ end }}
{{- end }}
{{- end }}
