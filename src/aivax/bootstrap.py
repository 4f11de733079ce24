"""First start, exactly once: an operator admin token and a demo account with keys and money.

Once-ness is a row in `system_state` inserted with ON CONFLICT DO NOTHING in the same
transaction as everything else, so two replicas starting together cannot both bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from aivax.accounts import service as account_service
from aivax.auth import operator_tokens
from aivax.db import insert_ignoring_conflicts
from aivax.keys import service as key_service
from aivax.keys.schemas import KeyCreate, KeyKind
from aivax.kit.clock import utcnow
from aivax.kit.money import micros_to_usd
from aivax.models import EntryKind, SystemState
from aivax.services import AppServices
from aivax.wallet import service as wallet_service

BOOTSTRAP_KEY = "bootstrap"
DEMO_PLAN = "free"


@dataclass(frozen=True, slots=True)
class BootstrapCredentials:
    admin_token: str
    account_id: str | None = None
    private_key: str | None = None
    public_key: str | None = None
    balance_micros: int = 0

    def banner(self, base_url: str) -> str:
        lines = [
            "=" * 72,
            "AIVAX first start: these secrets are shown ONCE. Store them now.",
            "=" * 72,
            f"  operator admin token : {self.admin_token}",
        ]
        if self.account_id:
            lines += [
                f"  demo account         : {self.account_id} (plan {DEMO_PLAN!r}, "
                f"balance {micros_to_usd(self.balance_micros)} USD)",
                f"  private key          : {self.private_key}",
                f"  public key           : {self.public_key}",
                "",
                "  Try it:",
                f"    curl {base_url}/v1/account -H 'Authorization: Bearer {self.private_key}'",
            ]
        lines.append("=" * 72)
        return "\n".join(lines)


async def bootstrap(services: AppServices) -> BootstrapCredentials | None:
    """Create the first credentials, or return None when this database was bootstrapped."""
    async with services.database.sessions() as session:
        claimed = await session.execute(
            insert_ignoring_conflicts(
                session.get_bind().dialect.name, SystemState.__table__, conflict_on=["key"]
            )
            .values(key=BOOTSTRAP_KEY, value={}, created_at=utcnow())
            .returning(SystemState.__table__.c.key)
        )
        if claimed.scalar_one_or_none() is None:
            return None
        _, admin_token = await operator_tokens.create(
            session, name="bootstrap", secret=services.secret
        )
        credentials = BootstrapCredentials(admin_token=admin_token)
        if services.settings.bootstrap_demo:
            credentials = await _demo_account(services, session, admin_token)
        await session.commit()
        return credentials


async def _demo_account(
    services: AppServices, session: AsyncSession, admin_token: str
) -> BootstrapCredentials:
    account = await account_service.create(
        session, name="Demo account", plan_id=DEMO_PLAN, secret_box=services.secret_box
    )
    keys = {}
    for kind in (KeyKind.PRIVATE, KeyKind.PUBLIC):
        _, keys[kind] = await key_service.create(
            session,
            account_id=account.id,
            data=KeyCreate(name=f"demo {kind.value} key", kind=kind),
            secret=services.secret,
            max_keys=services.settings.max_keys_per_account,
        )
    balance = services.settings.demo_balance_micros
    if balance:
        await wallet_service.post_credit(
            session,
            account_id=account.id,
            kind=EntryKind.TOPUP,
            amount_micros=balance,
            idempotency_key="bootstrap:demo-balance",
            description="Demo starting balance",
        )
    return BootstrapCredentials(
        admin_token=admin_token,
        account_id=str(account.id),
        private_key=keys[KeyKind.PRIVATE],
        public_key=keys[KeyKind.PUBLIC],
        balance_micros=balance,
    )
