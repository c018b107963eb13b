#!/usr/bin/env bash
# Copies the client certificates that `certwire certgen` wrote into namespace certwire
# (Secret certwire-client-LABEL) into the namespace of the proxy that uses them, as
# Secret certwire-client: a pod can mount only Secrets of its own namespace, and certgen
# writes all its Secrets into one namespace.
#
#   deploy/certgen/copy-client-secrets.sh edge-envoy=ingress istio-ingressgateway=istio-system
#
# Run it after every certgen run, the CronJob's included: a copy does not follow its
# original. The Secret goes from one kubectl to the other through the pipe, never into a
# file, and is written with server-side apply (client-side apply would keep a second
# copy of the key in the last-applied-configuration annotation).
# CERTWIRE_NAMESPACE (certwire) and CERTWIRE_CLIENT_SECRET (certwire-client) change the
# source namespace and the target name.
set -euo pipefail

source_namespace=${CERTWIRE_NAMESPACE:-certwire}
target_name=${CERTWIRE_CLIENT_SECRET:-certwire-client}

if [ $# -eq 0 ]; then
  echo "usage: $0 LABEL=NAMESPACE..." >&2
  exit 2
fi
for pair in "$@"; do
  label=${pair%%=*}
  namespace=${pair#*=}
  if [[ ! $label =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ || ! $namespace =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]]; then
    echo "$0: expected LABEL=NAMESPACE (Kubernetes names), got '$pair'" >&2
    exit 2
  fi
  # A Secret object named and placed for the target, with the source's data as is.
  template='apiVersion: v1
kind: Secret
metadata:
  name: TARGET_NAME
  namespace: TARGET_NAMESPACE
  labels:
    app.kubernetes.io/managed-by: certwire-certgen
type: kubernetes.io/tls
data:
{{- range $key, $value := .data}}
  {{$key}}: {{$value}}
{{- end}}
'
  template=${template/TARGET_NAME/$target_name}
  template=${template/TARGET_NAMESPACE/$namespace}
  kubectl -n "$source_namespace" get secret "certwire-client-$label" -o "go-template=$template" \
    | kubectl apply --server-side --field-manager=certwire-copy-client-secrets -f -
done
