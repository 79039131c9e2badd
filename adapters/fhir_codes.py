"""Codes and canonical URLs shared by everything that reads or writes FHIR."""

from __future__ import annotations

from core.types import Organ, RecistRole

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"  # diagnostic service section (RAD)
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

TUMOR_SIZE = "21889-1"  # Size Tumor
LONGEST_DIM = "33728-7"  # Size.maximum dimension in Tumor
OTHER_DIM = "33729-5"  # Size additional dimension in Tumor
RADIOLOGY_REPORT = "18782-3"  # Radiology Study observation (narrative)
RADIOLOGY_CATEGORY = "LP29684-5"  # Radiology

MCODE = "http://hl7.org/fhir/us/mcode/StructureDefinition"
PROFILE_TUMOR = f"{MCODE}/mcode-tumor"
PROFILE_TUMOR_SIZE = f"{MCODE}/mcode-tumor-size"

EXT_BASE = "http://interval.local/fhir/StructureDefinition"
EXT_CENTROID = f"{EXT_BASE}/lesion-centroid-lps"
EXT_ROLE = f"{EXT_BASE}/recist-role"
LABEL_SYSTEM = "http://interval.local/fhir/lesion-label"
PATIENT_ID_SYSTEM = "http://interval.local/fhir/mrn"
USER_SYSTEM = "http://interval.local/fhir/user"  # an Interval account (its user name), e.g. the signer
API_CLIENT_SYSTEM = "http://interval.local/fhir/api-client"  # an API client (its token's sub)

ORGAN_SNOMED: dict[Organ, tuple[str, str]] = {
    Organ.LIVER: ("10200004", "Liver structure"),
    Organ.LUNG: ("39607008", "Lung structure"),
    Organ.LYMPH_NODE: ("59441001", "Structure of lymph node"),
    Organ.ADRENAL: ("23451007", "Adrenal gland structure"),
    Organ.OTHER: ("87784001", "Soft tissues"),
}
SNOMED_ORGAN = {code: organ for organ, (code, _) in ORGAN_SNOMED.items()}
LATERALITY_SNOMED = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}
SNOMED_LATERALITY = {code: side for side, (code, _) in LATERALITY_SNOMED.items()}
ROLE_CODES = {r.value: r for r in RecistRole}
