"""SQLAlchemy models, one module per aggregate. Importing this package registers them all."""

from aivax.models.account import Account, AccountStatus, ApiKey
from aivax.models.base import Base
from aivax.models.catalog import CatalogModel, ProviderCredential, RequestLog
from aivax.models.gateway import Gateway, GatewayVersion
from aivax.models.job import Job, JobSchedule
from aivax.models.operator import OperatorToken, SystemState
from aivax.models.plan import Plan
from aivax.models.rag import Chunk, Collection, Document
from aivax.models.wallet import EntryKind, HoldStatus, LedgerEntry, WalletHold

__all__ = [
    "Account",
    "AccountStatus",
    "ApiKey",
    "Base",
    "CatalogModel",
    "Chunk",
    "Collection",
    "Document",
    "EntryKind",
    "Gateway",
    "GatewayVersion",
    "HoldStatus",
    "Job",
    "JobSchedule",
    "LedgerEntry",
    "OperatorToken",
    "Plan",
    "ProviderCredential",
    "RequestLog",
    "SystemState",
    "WalletHold",
]
