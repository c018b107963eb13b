"""A reference ACME client for certwire's fixture tests, independent of certwire.

It proves that the test CA (acme2certifier) and the test DNS (knot) work together
before certwire is pointed at them: it registers an account (optionally with
External Account Binding), orders a certificate over dns-01 with the TXT records
set and removed by `nsupdate` signed with the zone's TSIG key (or over http-01,
answered on 127.0.0.1:80, where knot's wildcard sends the CA), and reads the
certificate's ARI renewal window. It uses the `acme` library (certbot's), which
acme2certifier installs as a dependency.

Usage:
  acme_client.py --directory URL --out DIR [--eab-kid KID --eab-hmac KEY]
                 [--register-only | --domain NAME... [--tsig ALG:NAME:SECRET]
                                  | --domain NAME... --challenge http-01]

Writes DIR/result.json. Exit 0 on success; 3 when the CA refused: an ACME error
(type `urn:ietf:params:acme:error:...`) or an authorization it did not validate
(type `authorization-invalid`), carried as {"error": {"type", "detail"}}.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# acme2certifier answers within milliseconds here; the deadline only bounds a hang.
DEADLINE = datetime.timedelta(seconds=60)


class AuthorizationInvalid(Exception):
    """An authorization the CA did not validate."""

    def __init__(self, authzrs):
        super().__init__()
        self.authzrs = authzrs


def nsupdate(server: str, tsig: str, zone_cmds: list) -> None:
    """Runs one signed RFC 2136 update through nsupdate (bind9-dnsutils)."""
    script = f"server {server} 53\n" + "".join(c + "\n" for c in zone_cmds) + "send\n"
    subprocess.run(["nsupdate", "-y", tsig], input=script.encode(), check=True)


def register(net, directory, args):
    account_key = net.key
    eab = None
    if args.eab_kid:
        eab = messages.ExternalAccountBinding.from_data(
            account_public_key=account_key.public_key(),
            kid=args.eab_kid,
            hmac_key=args.eab_hmac,
            directory=directory,
        )
    acme = client.ClientV2(directory, net)
    regr = acme.new_account(
        messages.NewRegistration.from_data(
            email="test@certwire.test",
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
    )
    return acme, regr


class Http01Responder:
    """Answers http-01 on 127.0.0.1:80 from a dict of path -> key authorization."""

    def __init__(self):
        self.answers = {}
        answers = self.answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # pylint: disable=invalid-name
                body = answers.get(self.path)
                self.send_response(200 if body else 404)
                self.end_headers()
                if body:
                    self.wfile.write(body.encode())

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 80), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def publish(args, account_key, challb, identifier, records, responder):
    """Publishes the answer to one challenge: a TXT record or an http-01 file."""
    if isinstance(challb.chall, challenges.DNS01):
        name = challb.chall.validation_domain_name(identifier)
        value = challb.chall.validation(account_key)
        if args.tsig:
            nsupdate(args.dns_server, args.tsig, [f'update add {name}. 1 TXT "{value}"'])
            records.append(name)
    else:
        responder.answers[challb.chall.path] = challb.chall.validation(account_key)


def order(acme, account_key, args, out):
    """One challenge type for every name; TXT records removed and the http-01
    responder closed again whatever the outcome."""
    kind = challenges.DNS01 if args.challenge == "dns-01" else challenges.HTTP01
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    csr = crypto_util.make_csr(leaf_key_pem, args.domain)
    orderr = acme.new_order(csr)
    records = []
    responder = Http01Responder() if kind is challenges.HTTP01 else None
    try:
        chosen = []
        for authzr in orderr.authorizations:
            challb = next(c for c in authzr.body.challenges if isinstance(c.chall, kind))
            identifier = authzr.body.identifier.value
            publish(args, account_key, challb, identifier, records, responder)
            chosen.append(challb)
        for challb in chosen:
            acme.answer_challenge(challb, challb.chall.response(account_key))
        deadline = datetime.datetime.now() + DEADLINE
        orderr = acme.poll_authorizations(orderr, deadline)
        # acme2certifier 0.46 marks a failed challenge and its authorization
        # `invalid` but sends no `error` object (so the library raises nothing) and
        # leaves the order `pending`: look at the statuses ourselves.
        invalid = [a for a in orderr.authorizations if a.body.status != messages.STATUS_VALID]
        if invalid:
            raise AuthorizationInvalid(invalid)
        orderr = acme.finalize_order(orderr, deadline)
    finally:
        for name in records:
            nsupdate(args.dns_server, args.tsig, [f"update delete {name}. TXT"])
        if responder:
            responder.close()

    with open(os.path.join(out, "fullchain.pem"), "w", encoding="utf8") as f:
        f.write(orderr.fullchain_pem)
    with open(os.path.join(out, "key.pem"), "wb") as f:
        f.write(leaf_key_pem)
    return orderr.fullchain_pem, records


def renewal_window(acme, fullchain_pem: str):
    """The CA's ARI suggestedWindow for the certificate, as the CA sent it."""
    try:
        base = acme.directory["renewalInfo"]
    except KeyError:
        return None
    leaf = x509.load_pem_x509_certificate(fullchain_pem.encode())
    # pylint: disable=protected-access
    url = base + "/" + client._renewal_info_path_component(leaf)
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return response.json().get("suggestedWindow")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--directory", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--domain", action="append", default=[])
    parser.add_argument("--challenge", choices=["dns-01", "http-01"], default="dns-01")
    # Without --tsig the TXT records are not published: the challenge must fail.
    parser.add_argument("--tsig", help="ALG:NAME:SECRET, as nsupdate -y takes it")
    parser.add_argument("--dns-server", default="127.0.0.1")
    parser.add_argument("--eab-kid")
    parser.add_argument("--eab-hmac")
    parser.add_argument("--register-only", action="store_true")
    args = parser.parse_args()

    # ES256, the only account key type instant-acme (certwire's client) uses.
    account_key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(account_key, alg=jose.ES256, user_agent="certwire-fixture-test")
    directory = client.ClientV2.get_directory(args.directory, net)
    result = {}
    try:
        acme, regr = register(net, directory, args)
        net.account = regr
        result["account"] = regr.uri
        if not args.register_only:
            fullchain, records = order(acme, account_key, args, args.out)
            result["txt_records"] = records
            result["renewal_window"] = renewal_window(acme, fullchain)
        code = 0
    except messages.Error as err:
        result["error"] = {"type": err.typ, "detail": err.detail}
        code = 3
    except errors.ValidationError as err:
        # The CA's reason is on the failed challenge of each failed authorization.
        failed = [
            c.error for a in err.failed_authzrs for c in a.body.challenges if c.error
        ]
        result["error"] = {
            "type": failed[0].typ if failed else "validation",
            "detail": "; ".join(str(e.detail) for e in failed) or str(err),
        }
        code = 3
    except AuthorizationInvalid as err:
        result["error"] = {
            "type": "authorization-invalid",
            "detail": "; ".join(
                f"{a.body.identifier.value}: {a.body.status.name}, challenges "
                + ", ".join(
                    f"{c.to_partial_json().get('type')}={c.status.name}"
                    for c in a.body.challenges
                )
                for a in err.authzrs
            ),
        }
        code = 3
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
