#!/bin/sh
# Test certificates, made fresh into DIR at test time (never committed):
#   ca.pem                       the CA etcd and fmwire trust
#   server.pem server.key        etcd's, for 127.0.0.1 and localhost, from ca
#   client.pem client.key        a client's, from ca
#   other-ca.pem                 another CA
#   other-client.pem other-client.key   a client's, from the other CA
# EC P-256 keys, valid one day. Usage: make_test_certs.sh DIR
set -eu
dir=$1
mkdir -p "$dir"
cd "$dir"
curve="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"

make_ca() {  # NAME
  openssl req -x509 $curve -keyout "$1.key" -out "$1.pem" -days 1 -subj "/CN=fmwire test $1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}

make_leaf() {  # NAME CA EXTENSIONS
  openssl req $curve -keyout "$1.key" -out "$1.csr" -subj "/CN=fmwire test $1" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -out "$1.pem" -days 1 \
    -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

make_ca ca
make_ca other-ca
make_leaf server ca "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
make_leaf client ca "extendedKeyUsage=clientAuth"
make_leaf other-client other-ca "extendedKeyUsage=clientAuth"
chmod 600 ./*.key
