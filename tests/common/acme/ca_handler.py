"""acme2certifier CA handler for certwire's tests: the stock openssl_ca_handler,
with certificate lifetimes in minutes instead of whole days.

The stock handler only knows `cert_validity_days`; renewal tests need certificates
that expire within a test run. This module is named by path in acme_srv.cfg
(`[CAhandler] handler_module: .../ca_handler.py`) and reads one extra key,
`cert_validity_minutes`, from the same section. Without it, it is the stock handler.
"""

import datetime

from acme2certifier.acme_srv.helper import load_config
from acme2certifier.cahandlers.openssl_ca_handler import CAhandler as OpensslCAhandler


class CAhandler(OpensslCAhandler):
    """openssl_ca_handler with an optional lifetime in minutes."""

    def __init__(self, debug: bool = False, logger: object = None):
        super().__init__(debug, logger)
        self.cert_validity_minutes = None

    def _config_load(self):
        super()._config_load()
        config_dic = load_config(self.logger, "CAhandler")
        minutes = config_dic.get("CAhandler", "cert_validity_minutes", fallback=None)
        if minutes:
            self.cert_validity_minutes = int(minutes)

    def _certexpiry_date_default(self) -> datetime.datetime:
        if self.cert_validity_minutes is None:
            return super()._certexpiry_date_default()
        now = datetime.datetime.now(datetime.timezone.utc)
        return now + datetime.timedelta(minutes=self.cert_validity_minutes)
