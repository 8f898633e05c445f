"""Rule-based CheXpert-style labeler for chest X-ray reports.

Labels the 14 CheXpert observations of a free-text report as POSITIVE, NEGATIVE, UNCERTAIN or NOT_MENTIONED with
hand-written rules: mention extraction, negation and uncertainty cues with a clause-bounded scope, then aggregation
into one state per observation. Deterministic, no model. CDAN's disease targets and clinical-efficacy metrics use it,
because IU X-Ray has no CheXpert labels. The rules, the "No Finding" convention and the validation against IU X-Ray's
expert MeSH tags (`mesh_cdan`) are described in ``docs/labeler.md``. The phrase lists were written for this project.

References:
    - Irvin et al., "CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and Expert Comparison",
      AAAI 2019 (the observations, the label states, the "No Finding" convention).
    - Chapman et al., "A Simple Algorithm for Identifying Negated Findings and Diseases in Discharge Summaries",
      J. Biomed. Inform. 34(5), 2001 (NegEx).
    - Harkema et al., "ConText: An algorithm for determining negation, experiencer, and temporal status from clinical
      reports", J. Biomed. Inform. 42(5), 2009 (hypothetical and historical mentions).
    - Peng et al., "NegBio: a high-performance tool for negation and uncertainty detection in radiology reports",
      AMIA Summits 2018.
    - Panicek & Hricak, "How Sure Are You, Doctor? A Standardized Lexicon to Describe the Radiologist's Level of
      Certainty", AJR 207(1), 2016 (which hedges assert a finding and which leave it uncertain).
"""

from __future__ import annotations

import bisect
import re
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

try:
    from .configuration_cdan import CHEXPERT_OBSERVATIONS
except ImportError:
    from configuration_cdan import CHEXPERT_OBSERVATIONS


POSITIVE = 1
NEGATIVE = 0
UNCERTAIN = -1
NOT_MENTIONED = -2

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
OTHER_FINDING = "Other Finding"
"""Internal pseudo-observation for abnormalities outside the 14 CheXpert observations (decides "No Finding")."""

PATHOLOGY_OBSERVATIONS = tuple(name for name in CHEXPERT_OBSERVATIONS if name not in (NO_FINDING, SUPPORT_DEVICES))
"""The observations whose POSITIVE or UNCERTAIN state rules out "No Finding" (CheXpert's convention)."""

LUNG_OPACITY_CHILDREN = ("Consolidation", "Pneumonia")
"""Observations whose POSITIVE or UNCERTAIN state is propagated to their parent, Lung Opacity."""

EVALUATION_OBSERVATIONS = (
    "Atelectasis",
    "Cardiomegaly",
    "Edema",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Support Devices",
)
"""The nine observations whose macro-F1 against IU X-Ray's MeSH tags is the labeler's headline number."""


# --------------------------------------------------------------------------------------------------------------------
# Phrase lists. Each entry is a regular expression over normalised (lower-cased) text; entries are joined with "|" and
# wrapped in word boundaries. "_GAP" allows a few intervening words ("heart is mildly enlarged").
# --------------------------------------------------------------------------------------------------------------------

_GAP = r"(?:[\w'/-]+\s+){0,4}?"
_LUNG = r"(?:lungs?|lung fields?|lung bases?|bases|pulmonary parenchyma|parenchyma)"
_HEART = (
    r"(?:heart|cardiac silhouette|cardiac shadow|heart shadow|cardiac size|heart size|cardiac contour"
    r"|heart silhouette)"
)

MENTION_PHRASES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"widen(?:ed|ing) (?:of )?(?:the )?(?:superior |upper )?mediastin\w*",
        r"(?:superior |upper )?mediastin\w* (?:silhouette |contours? )?(?:is |are |appears |remains )?"
        + _GAP
        + r"(?:widened|widening|prominent|prominence|enlarged|enlargement)",
        r"(?:prominent|prominence of the|enlarged|enlargement of the) (?:superior |upper )?mediastin\w*",
        r"mediastinal (?:mass|adenopathy|lymphadenopathy|widening|prominence)",
        r"(?:right )?paratracheal (?:prominence|widening|fullness|stripe (?:is )?(?:widened|prominent))",
        r"widening (?:of|adjacent to) the (?:right )?paratracheal stripe",
        r"(?:prominent|widened|enlarged) (?:vascular pedicle|(?:right )?paratracheal stripe)",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        # An enlarged cardiomediastinal silhouette is, in practice, an enlarged heart (IU's experts index it
        # "Cardiac Shadow/enlarged"), so it is read as Cardiomegaly, not Enlarged Cardiomediastinum.
        r"(?:enlarged|prominent|widened) cardiomediastinal (?:silhouette|contours?|shadow)",
        r"cardiomediastinal (?:silhouette|contours?|shadow) (?:is |are |appears |remains )?"
        + _GAP
        + r"(?:enlarged|widened|prominent)",
        r"enlargement of the cardiomediastinal (?:silhouette|contours?|shadow)",
        r"borderline (?:enlarged |large )?(?:heart|cardiac|cardiomediastinal)(?: size| silhouette| contour| shadow)?",
        _HEART + r" (?:size )?(?:is |appears |remains )?borderline",
        r"cardiac (?:enlargement|hypertrophy)",
        r"(?:enlarged|large|prominent) (?:heart|cardiac silhouette|cardiac shadow|heart shadow|heart size)",
        r"(?:enlarged|large|prominent) cardiac size",
        r"enlargement of the (?:heart|cardiac silhouette|cardiac shadow|heart shadow)",
        _HEART + r" (?:is |are |appears |remains |seems )?" + _GAP + r"(?:enlarged|enlargement|large|increased)",
        r"increase in (?:the )?(?:size of the )?" + _HEART,
    ),
    "Lung Opacity": (
        r"opacit(?:y|ies)",
        r"opacifi(?:cation|ed)",
        r"densit(?:y|ies)",
        r"infiltrat(?:e|es|es|ion|ive)",
        r"air[- ]?space (?:disease|process|opacit(?:y|ies)|filling)",
        r"hazy|haziness|streakiness",
        r"ground[- ]glass",
        r"alveolar (?:process|disease|filling)",
    ),
    "Lung Lesion": (
        r"nodules?",
        r"masse?s?(?! effect)|mass-?like",
        r"(?:pulmonary|lung|cavitary|parenchymal|spiculated|nodular) lesions?",
    ),
    "Edema": (
        r"o?edema(?:tous)?",
        r"(?:pulmonary |vascular |venous |central |interstitial )*congestion",
        r"congestive (?:changes?|heart failure|failure)|chf",
        r"heart failure|cardiac decompensation|fluid overload",
        r"pulmonary venous hypertension",
        r"cephalization|kerley b?[- ]?lines",
        (
            r"(?:increased|prominent|engorged|indistinct|distended) (?:pulmonary |central |hilar )?"
            r"(?:vascularity|vasculature|vascular markings|vessels)"
        ),
        r"(?:pulmonary |central |hilar )(?:vascularity|vasculature|vascular markings|vessels|xxxx) "
        r"(?:is |are |appears? |remains? )?" + _GAP + r"(?:increased|prominent|engorged|indistinct|congested)",
        r"vascular (?:engorgement|prominence|indistinctness)",
    ),
    "Consolidation": (r"consolidat(?:ion|ions|ive|ed)",),
    "Pneumonia": (
        r"pneumonias?",
        r"bronchopneumonia",
        r"pneumonitis",
    ),
    "Atelectasis": (
        r"atelecta(?:sis|ses|tic)",
        r"(?:lobar|lobe|lung|segmental) collapse",
        r"collapse of the (?:\w+ )?(?:\w+ )?(?:lobe|lung)",
    ),
    "Pneumothorax": (r"pneumothora(?:x|ces)",),
    "Pleural Effusion": (
        r"pleural effusions?",
        r"effusions?",
        r"pleural fluid",
        r"fluid (?:in|within) the (?:\w+ )?(?:pleural space|fissure)",
        r"hydrothorax|hemothorax",
    ),
    "Pleural Other": (
        r"pleural (?:thickening|scarring|scar|plaques?|calcifications?|fibrosis)",
        r"pleural[- ](?:parenchymal|peripheral) (?:scarring|scar|thickening)",
        r"thickening of the (?:\w+ )?(?:pleura|fissures?)|fissural thickening|(?:pleural|fissural) reaction",
        r"(?:apical|biapical) (?:[\w-]+ )?(?:pleural )?(?:thickening|capping|caps?)",
        r"fibrothorax",
    ),
    "Fracture": (
        r"fractures?|fractured",
        r"fx",
    ),
    "Support Devices": (
        r"(?:catheter|lead|wire) fracture",
        r"pace ?makers?|pacers?|defibrillators?|aicds?|icds?|(?:pulse )?generator",
        (
            r"(?:pacemaker|pacer|cardiac|monitor|monitoring|ecg|ekg|telemetry|transvenous|defibrillator|pacing) "
            r"(?:leads?|wires?|generator|device)"
        ),
        r"leads(?! to)|lead (?:tips?|terminat\w*|in the|projects?)",
        r"catheters?|picc|port[- ]?a[- ]?cath|portacath|porta[- ]?catheter|mediport|power ?port|xxxx-a-xxxx",
        (
            r"(?:central|venous|picc|midline|jugular|subclavian|arterial|dialysis|swan[- ]ganz|pa) (?:venous )?"
            r"(?:lines?|catheters?)"
        ),
        r"lines and tubes|tubes and lines|support (?:lines|apparatus|devices)",
        (
            r"(?:endotracheal|et|nasogastric|ng|orogastric|og|feeding|chest|tracheostomy|enteric|gastric|dobhoff|"
            r"thoracostomy|drainage|g|j) tubes?"
        ),
        r"tracheostomy|trach",
        r"shunt(?: tubing| catheter)?",
        r"stents?|stented",
        r"(?:surgical|vascular|cholecystectomy|metallic|hemostatic|axillary|mediastinal|cabg) clips?|clips",
        r"valve replacement|prosthetic (?:\w+ )?valves?|valve prosthes[ie]s|annuloplasty ring|replaced (?:\w+ )?valve",
        r"(?:sternotomy|sternal|cerclage) (?:wires?|sutures?)",
        r"(?:cabg|bypass|graft) markers?",
        r"(?:nerve|spinal cord|vagal) stimulator|(?:neuro)?stimulator",
        r"(?:embolization )?coils?|(?:ivc )?filter|loop recorder|cardiac monitor|occluder|closure device|devices?",
        r"drains?",
        r"sutures?|suture material",
        r"electrodes?",
        (
            r"(?:shoulder|humeral|hip|joint) (?:prosthesis|arthroplasty|replacement)|arthroplasty|bone anchors?|"
            r"(?:internal )?fixation (?:hardware|plates?|screws?|device)|internal fixation"
        ),
        r"tubes?",
        r"tips?",
    ),
}
"""Mention phrases per CheXpert observation ("No Finding" has none: it is derived)."""

SHARED_MENTION_PHRASES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("Pneumothorax", "Pleural Effusion"), (r"hydropneumothora(?:x|ces)|hemopneumothora(?:x|ces)",)),
)
"""Phrases that are evidence for several observations at once (a hydropneumothorax is air and fluid)."""

OTHER_FINDING_PHRASES: tuple[str, ...] = (
    # Opacities that are not in the lung (they take precedence over the Lung Opacity phrases).
    (
        r"(?:sclerotic|bony|bone|osseous|metallic|metal|soft tissue|curvilinear|tubular|skin fold|"
        r"foreign body|breast|nipple|paratracheal|substernal|retrosternal|mediastinal|supracardiac|vascular|cortical) "
        r"(?:opacit(?:y|ies)|densit(?:y|ies))"
    ),
    (
        r"(?:opacit(?:y|ies)|densit(?:y|ies))(?: [\w/-]+){0,5}? "
        r"(?:over|overlying|projecting over|projected over|projects over|in|of|within|at|superior to|adjacent to|along"
        r"|near|from) (?:the )?(?:[\w-]+ ){0,3}"
        r"(?:ribs?|spine|vertebra\w*|vertebral body|clavicles?|breasts?|soft tissues?|sternum|mediastinum|heart"
        r"|glenoid|humer\w+|shoulder|chest wall|subcutaneous \w+|axilla\w*|skin|scapula\w*|thyroid|aort\w+|neck"
        r"|abdomen|stomach)"
    ),
    r"granulomatous (?:[\w-]+ )?(?:infection|disease|process|exposure|changes?)",
    r"(?:calcified )?granulomas?|granulomatous",
    r"infection|infectious|inflammation|inflammatory",
    r"(?:soft tissue|subcutaneous|extremity|ankle|leg) (?:o?edema|swelling)",
    r"(?:thyroid|pericardial|pleural|chest wall|breast|soft tissue|neck|paratracheal|axillary) mass(?:es)?",
    r"neoplasms?|neoplastic|tumou?rs?|malignan(?:cy|cies|t)|carcinoma|cancer|metasta(?:sis|ses|tic)|lymphoma",
    r"calcifi(?:cation|cations|ed)|calcinosis",
    r"histoplasm\w*|tuberculosis|sarcoid\w*",
    r"degenerat\w+|spondylo\w+|osteophyt\w+|arthriti\w*|arthropathy|arthrosis|dish",
    r"(?:dextro|levo|rotary )?scolio\w+|kypho\w+",
    r"(?:dextro|levo)[- ]?curvature|(?:spinal |thoracic |vertebral )?curvature",
    r"spurs?|spurring|syndesmophytes?|enthesophytes?",
    r"hyper-?(?:inflat|expan|aerat|lucen|distend|distention)\w*|over-?(?:inflat|expan)\w*",
    r"emphysema\w*|copd|chronic obstructive|bullae|bullous|bulla|blebs?",
    r"(?:flatten(?:ed|ing)|elevat(?:ed|ion)|eventration) (?:of )?(?:the )?(?:\w+ )?(?:hemi-?diaphragms?|diaphragms?)",
    r"(?:hemi-?diaphragms?|diaphragms?) (?:is |are |appears? |remains? )?" + _GAP + r"(?:flattened|elevated|raised)",
    r"eventration",
    r"hernias?",
    r"tortuo(?:us|sity)|ectatic|ectasia|unfold(?:ed|ing)|aneurysm\w*",
    r"atheroscl\w+|atheromatous",
    r"scar|scars|scarring|scarred|cicatri\w+",
    r"fibrosis|fibrotic",
    r"(?:interstitial|bronchovascular|lung|pulmonary|vascular) markings",
    r"interstitial (?:prominence|changes?|disease|lung disease|pattern|thickening)|reticula\w+",
    r"bronchiectasis|bronchiectatic|bronchitis|bronchitic",
    r"peribronchial (?:thickening|cuffing)|bronchial (?:wall )?thickening",
    r"(?:low|decreased|diminished|reduced) (?:lung )?volumes?",
    r"(?:lung )?volumes? (?:are |is )?(?:low|decreased|diminished|reduced)",
    r"hypo-?(?:inflat|aerat|expan|ventilat)\w*|poor (?:inspiration|inspiratory effort)|shallow inspiration",
    r"(?:increased|large|high) lung volumes|crowding|crowded",
    r"rotat(?:ed|ion)|motion|lordotic|nondiagnostic|non-diagnostic|suboptimal|technically limited|technical factors",
    r"limited (?:exam|examination|study|evaluation|assessment|view)|(?:exam|examination|study|evaluation) is limited",
    r"artifacts?|artifactual",
    r"(?:lymph)?adenopathy|lymph nodes?",
    r"(?:prominent|enlarged|bulky|full) (?:bi|peri)?hil(?:um|a|ar)\w*",
    r"(?:bi|peri)?hilar (?:prominence|enlargement|fullness)",
    r"cysts?|cystic|cavit\w+",
    r"pericardial effusions?",
    r"pectus|(?:funnel|pigeon) chest",
    r"deformit(?:y|ies)|deformed",
    r"osteopeni\w+|demineraliz\w+|osteoporo\w+",
    r"(?:spinal |spine |cervical |lumbar |thoracic )?fusion(?: hardware)?",
    r"(?:orthopedic|spinal) (?:hardware|rods?|screws?)|kyphoplasty|vertebroplasty",
    r"(?:scapular|scapula|coracoid|clavicular) tips?|tip of the (?:scapula|clavicle|coracoid|\w+ rib|xxxx)",
    r"mastectomy|pneumonectomy|lobectomy|resection|post-?operative|post-?surgical|surgical changes|sternotomy|cabg",
    r"nipple (?:shadows?|markers?)",
    r"azygos (?:lobe|fissure)",
    r"fat pads?|(?:epicardial|pericardial|mediastinal) fat|lipoma",
    r"lucenc(?:y|ies)",
    r"foreign bod(?:y|ies)|bullets?|shrapnel|fragments?|projectile|piercings?|(?:nipple|body) rings?",
    r"breast (?:implants?|prosthes[ie]s)|implants?",
    r"pneumoperitoneum|free air|pneumomediastinum|subcutaneous (?:air|emphysema)",
    r"sclero(?:sis|tic)|hyperostosis|lytic|(?:bone|bony|osseous) lesions?",
    r"(?:enlarged|dilated|prominent) (?:central )?pulmonary arter(?:y|ies)|pulmonary (?:arterial )?hypertension",
    r"volume loss",
    r"shift(?:ed)?",
    r"(?:blunt(?:ed|ing)) (?:of )?(?:the )?(?:\w+ )?costophrenic",
    r"costophrenic (?:\w+ )?(?:angles? |sulc(?:us|i) )?(?:is |are )?blunt\w*",
)
"""Abnormalities outside the 14 CheXpert observations; under the strict rule a POSITIVE or UNCERTAIN one rules out
"No Finding"."""

_NORMAL = (
    r"(?:grossly |otherwise |essentially |overall |now |again )?"
    r"(?:normal|within (?:the )?(?:normal limits|limits of normal)|unremarkable"
    r"|(?:at |on )?(?:the )?(?:upper limits?|top|high) (?:of )?normal)"
)
_BE = r"(?:is |are |appears? |remains? |seems? |looks? )?"

NORMAL_STATEMENTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("Lung Opacity",),
        _LUNG + r" (?:are |is |appear |appears |remain |remains )?(?:grossly |otherwise |now |again )?clear"
        r"|clear "
        + _LUNG
        + r"|"
        + _LUNG
        + r" (?:are |is )?(?:otherwise )?(?:well[- ]aerated|well[- ]expanded and clear)",
    ),
    (
        ("Cardiomegaly", "Edema"),
        _HEART
        + r" and (?:the )?(?:pulmonary |central )?(?:vascularity|vasculature|vascular engorgement|vessels|xxxx) "
        + _BE
        + _NORMAL,
    ),
    (
        ("Cardiomegaly",),
        _HEART + r" (?:and \w+ (?:\w+ )?)?" + _BE + _NORMAL + r"|normal (?:heart|cardiac) (?:size|silhouette)",
    ),
    (
        ("Edema",),
        r"(?:pulmonary |central )?(?:vascularity|vasculature|vascular engorgement|vascular markings|vessels) "
        + _BE
        + _NORMAL
        + r"|normal (?:pulmonary )?(?:vascularity|vasculature)",
    ),
    (
        ("Enlarged Cardiomediastinum", "Cardiomegaly"),
        r"cardio-?\s?mediastinal (?:silhouettes?|contours?|shadows?) (?:and \w+ (?:\w+ )?)?"
        + _BE
        + _NORMAL
        + r"|normal cardiomediastinal (?:silhouette|contours?)",
    ),
    (
        ("Enlarged Cardiomediastinum",),
        r"(?:mediastinum|mediastinal (?:silhouettes?|contours?|shadows?)) (?:and \w+ (?:\w+ )?)?"
        + _BE
        + _NORMAL
        + r"|normal mediastinal (?:silhouette|contours?)",
    ),
    (
        ("Fracture",),
        r"(?:acute )?(?:bony|osseous|bone|skeletal) (?:abnormalit(?:y|ies)|findings?|injury|structures "
        + _BE
        + r"(?:grossly )?(?:intact|unremarkable|normal))",
    ),
    (
        (OTHER_FINDING,),
        r"normal (?:\w+ )?markings|markings "
        + _BE
        + _NORMAL
        + r"|(?:lung )?volumes? "
        + _BE
        + r"(?:low|high)[- ]normal|(?:low|high)[- ]normal (?:lung )?volumes?",
    ),
)
"""Explicit normal statements: each gives a NEGATIVE mention of the listed observations."""

NEGATION_CUES: tuple[str, ...] = (
    r"no",
    r"not",
    r"without",
    r"negative for",
    r"unlikely",
    r"free of",
    r"clear of|clear(?= (?:focal )?air ?space)",
    r"absent|absence of",
    r"neither|nor",
    r"resolution of|interval clearing of|clearing of",
    r"removal of",
    r"rather than",
    r"rules?[- ]out|ruled[- ]out",
)
"""Cues that negate the findings that follow them in the same clause ("no pleural effusion")."""

POST_NEGATION_CUES: tuple[str, ...] = (
    (
        r"(?:is |are |was |were |has been |have been )?(?:not|no longer) (?:[\w]+ )?(?:well[- ])?(?:seen|identified|"
        r"visualized|evident|present|demonstrated|appreciated|noted|visible|detected|apparent)"
    ),
    r"(?:has |have |is |are )?(?:now |since |completely |entirely )?(?:resolved|cleared|been removed)",
    r"(?:is|are) (?:now )?(?:absent|gone|unlikely)",
)
"""Cues that negate the finding before them, at most six words before ("pneumothorax is not seen")."""

BIDIRECTIONAL_NEGATION_CUES: tuple[str, ...] = (r"resolved|cleared|removed",)
"""Cues that negate a finding on either side ("resolved pneumonia", "the effusion resolved")."""

UNCERTAINTY_CUES: tuple[str, ...] = (
    r"possible|possibly|perhaps|less likely",
    r"may|might|could",
    r"questionable|questioned|question of|query",
    r"suspicion (?:for|of)|suspected|suspect",
    r"equivocal|indeterminate|uncertain|not certain",
    r"correlate for|differential",
)
"""Cues that make the findings that follow them uncertain ("possible small effusion", "may represent atelectasis")."""

HEDGE_CUES: tuple[str, ...] = (
    r"suspicious(?: for| of)?",
    r"(?:to |that would )?(?:suggestive of|suggests?|suggesting|suggestion of)",
    r"(?:to )?indicate|indicating|indicative of",
    r"concerning for|concern for|worrisome for|worrisome",
    r"typical (?:for|of)|typical|characteristic of",
)
"""Uncertainty cues that a preceding negation carries through: they make the findings after them UNCERTAIN, but
"no focal opacity to suggest pneumonia" and "no suspicious nodules" stay NEGATIVE."""

HYPOTHETICAL_CUES: tuple[str, ...] = (
    r"if(?: there (?:is|are|be))?|in case of|should (?:there be|there|this|it|symptoms)|in the event of",
    r"to (?:further )?(?:exclude|rule[- ]out|evaluate|assess|characterize|investigate|confirm|look)",
    r"for (?:further )?(?:evaluation|assessment|characterization|exclusion) of",
    r"(?:evaluate|evaluation|assess|assessment|screen|screening|look|search) for",
    r"(?:history|hx) of|clinical history",
)
"""Cues that make the findings after them hypothetical or historical, as in ConText (Harkema et al., 2009): the
mention is not about this study ("if there is concern for fracture, consider rib films", "recommend CT to exclude a
mass", "history of pneumonia"), so it is ignored."""

POST_UNCERTAINTY_CUES: tuple[str, ...] = (
    r"(?:is|are) (?:\w+ )?(?:suspected|possible|questioned|a consideration|considered|not certain|uncertain)",
)
"""Cues that make the finding before them uncertain, at most six words before ("pneumonia is suspected")."""

BIDIRECTIONAL_UNCERTAINTY_CUES: tuple[str, ...] = (
    r"cannot (?:be )?(?:entirely |completely |totally )?(?:excluded|exclude|ruled out|rule out)",
    r"can ?not (?:be )?(?:excluded|exclude)|can't (?:be )?(?:excluded|exclude|ruled out|rule out)",
    r"(?:is |are )?not (?:entirely |completely |totally )?(?:excluded|ruled out)",
    r"(?:difficult|hard) to (?:exclude|rule out)",
)
"""Cues that make findings on either side uncertain ("cannot exclude pneumonia", "a pneumonia cannot be excluded")."""

ALTERNATIVE_CUES: tuple[str, ...] = (r"versus|vs",)
"""Cues that make the two findings they join uncertain ("effusion versus scarring"); they reach at most
`ALTERNATIVE_WINDOW_WORDS` words to either side."""

ALTERNATIVE_WINDOW_WORDS = 3

PSEUDO_NEGATIONS: tuple[str, ...] = (
    (
        r"no (?:significant |substantial |appreciable |definite |major )?(?:interval )?"
        r"(?:change|changes|increase|worsening|progression|enlargement)"
    ),
    r"not (?:significantly |substantially )?(?:changed|increased|worsened)",
    r"without (?:significant |substantial )?(?:interval )?(?:change|increase|worsening|progression)",
    r"not only",
    r"most (?:suggestive of|compatible with|consistent with|indicative of|typical of)",
    (
        r"(?:partial|partially|incomplete|incompletely|near|nearly|almost|not completely|not entirely) "
        r"(?:resolved|resolution|cleared|clearing)"
    ),
)
"""Phrases that contain a negation word but negate nothing ("no change in the small effusion")."""

SCOPE_TERMINATORS: tuple[str, ...] = (
    r"but|however|although|though|yet|whereas|while",
    r"except|aside from|apart from|other than|besides",
    r"which|who|that is",
    r"with",
    r"there (?:is|are|has been|have been)",
    r"otherwise",
)
"""Words that end the scope of a negation or uncertainty cue."""


def _compile(patterns: Iterable[str]) -> re.Pattern:
    return re.compile(r"(?<![\w-])(?:" + "|".join(patterns) + r")(?![\w])")


_SENTENCE_BREAK = re.compile(r"(?<!\d)\.(?!\d)|\.(?=\s|$)|[;?!\n]")
_DEIDENTIFIED_XRAY = re.compile(r"\bx-xxxx\b")
_WHITESPACE = re.compile(r"[ \t\r\f\v]+")
_POST_CUE_WINDOW_WORDS = 6
_WORD = re.compile(r"[\w']+")
_LATIN_LETTER = re.compile(r"[a-z]")
_ANY_LETTER = re.compile(r"[^\W\d_]")

MAX_SENTENCE_WORDS = 200
"""Longest sentence, in words, that the negation and uncertainty rules read as one: a longer run of text without a
sentence end is cut into pieces of this many words, and no cue reaches across a cut. Real reports stay far below it
(the longest sentence of the 3,955 Open-I reports has 47 words); the limit keeps labeling linear in the length of the
text, since the rules compare every cue of a sentence with every phrase of it."""


@dataclass(frozen=True)
class Mention:
    """One phrase found in a report, with the state given to it by the negation and uncertainty rules.

    Args:
        observations (`tuple[str, ...]`):
            The observations the phrase is evidence for (one CheXpert observation, several for phrases such as
            "hydropneumothorax", or `OTHER_FINDING`).
        text (`str`):
            The matched phrase, in normalised (lower-cased) form.
        start (`int`):
            Character offset of the phrase in the normalised report.
        end (`int`):
            Character offset just past the phrase.
        state (`int`):
            `POSITIVE`, `NEGATIVE` or `UNCERTAIN`; `NOT_MENTIONED` for a hypothetical or historical mention ("if
            there is concern for fracture"), which aggregation ignores.
        cue (`str`, *optional*, defaults to `""`):
            The cue that decided the state ("no", "may", "cannot be excluded", ...); empty for a positive mention
            or a normal statement.
    """

    observations: tuple[str, ...]
    text: str
    start: int
    end: int
    state: int
    cue: str = ""


@dataclass(frozen=True)
class _Cue:
    start: int
    end: int
    effect: int | str  # NEGATIVE, UNCERTAIN, NOT_MENTIONED (hypothetical), "terminator" or "pseudo"
    direction: str  # "before" (the cue precedes its finding), "hedge" (a weak "before"), "after", "both" or ""
    window: int | None  # the most words between cue and finding; None: the whole clause


class CheXpertRuleLabeler:
    """Rule-based labeler of the 14 CheXpert observations in a free-text chest X-ray report.

    The phrase lists are compiled once; an instance is stateless afterwards, so it is deterministic and can be shared.

    Args:
        no_finding_rule (`str`, *optional*, defaults to `"strict"`):
            `"strict"`: "No Finding" is POSITIVE only when no pathology observation and no other abnormality
            (`OTHER_FINDING_PHRASES`) is POSITIVE or UNCERTAIN. `"chexpert"`: CheXpert's rule, where only the 12
            pathology observations count.
        propagate_to_lung_opacity (`bool`, *optional*, defaults to `True`):
            Raise Lung Opacity to at least the state of a POSITIVE or UNCERTAIN consolidation or pneumonia.

    Example:

    ```python
    >>> labeler = CheXpertRuleLabeler()
    >>> states = labeler("Mild cardiomegaly. No pleural effusion.")
    >>> dict(zip(CHEXPERT_OBSERVATIONS, states))["Cardiomegaly"]
    1
    ```
    """

    def __init__(self, no_finding_rule: str = "strict", propagate_to_lung_opacity: bool = True) -> None:
        if no_finding_rule not in ("strict", "chexpert"):
            raise ValueError(f"no_finding_rule must be 'strict' or 'chexpert', got {no_finding_rule!r}")
        self.no_finding_rule = no_finding_rule
        self.propagate_to_lung_opacity = propagate_to_lung_opacity
        rules: list[tuple[tuple[str, ...], re.Pattern, int | None]] = []
        for observations, pattern in NORMAL_STATEMENTS:
            rules.append((observations, _compile([pattern]), NEGATIVE))
        for observations, phrases in SHARED_MENTION_PHRASES:
            rules.append((observations, _compile(phrases), None))
        for observation, phrases in MENTION_PHRASES.items():
            rules.append(((observation,), _compile(phrases), None))
        rules.append(((OTHER_FINDING,), _compile(OTHER_FINDING_PHRASES), None))
        self._mention_rules = tuple(rules)
        # Order matters only between cues of the same span: the earlier rule wins.
        self._cue_rules = (
            (_compile(PSEUDO_NEGATIONS), "pseudo", "", None),
            (_compile(BIDIRECTIONAL_UNCERTAINTY_CUES), UNCERTAIN, "both", _POST_CUE_WINDOW_WORDS),
            (_compile(ALTERNATIVE_CUES), UNCERTAIN, "both", ALTERNATIVE_WINDOW_WORDS),
            (_compile(POST_UNCERTAINTY_CUES), UNCERTAIN, "after", _POST_CUE_WINDOW_WORDS),
            (_compile(UNCERTAINTY_CUES), UNCERTAIN, "before", None),
            (_compile(HEDGE_CUES), UNCERTAIN, "hedge", None),
            (_compile(HYPOTHETICAL_CUES), NOT_MENTIONED, "before", None),
            (_compile(BIDIRECTIONAL_NEGATION_CUES), NEGATIVE, "both", _POST_CUE_WINDOW_WORDS),
            (_compile(POST_NEGATION_CUES), NEGATIVE, "after", _POST_CUE_WINDOW_WORDS),
            (_compile(NEGATION_CUES), NEGATIVE, "before", None),
            (_compile(SCOPE_TERMINATORS), "terminator", "", None),
        )

    @staticmethod
    def normalize(text: str) -> str:
        """Fold Unicode compatibility forms (NFKC: full-width letters and spaces become ASCII), lower-case, turn
        "x-XXXX" into "x-ray" and collapse spaces (line breaks are kept)."""
        text = unicodedata.normalize("NFKC", _check_text(text, "text")).lower()
        text = _DEIDENTIFIED_XRAY.sub("x-ray", text)
        return _WHITESPACE.sub(" ", text).strip()

    @staticmethod
    def _sentence_breaks(text: str) -> list[int]:
        """Offsets where a sentence ends, plus a cut every `MAX_SENTENCE_WORDS` words of a longer sentence."""
        breaks = [match.start() for match in _SENTENCE_BREAK.finditer(text)]
        cuts = []
        next_break, words_in_sentence = 0, 0
        for word in _WORD.finditer(text):
            while next_break < len(breaks) and breaks[next_break] < word.start():
                next_break, words_in_sentence = next_break + 1, 0
            if words_in_sentence == MAX_SENTENCE_WORDS:
                cuts.append(word.start())
                words_in_sentence = 0
            words_in_sentence += 1
        if cuts:
            warnings.warn(
                f"A report has text longer than {MAX_SENTENCE_WORDS} words without a sentence end; it was cut "
                f"{len(cuts)} time(s) into pieces of at most {MAX_SENTENCE_WORDS} words (labeler_cdan."
                "MAX_SENTENCE_WORDS), and no negation or uncertainty cue reaches across a cut.",
                stacklevel=4,
            )
            breaks = sorted(breaks + cuts)
        return breaks

    def _find_cues(self, text: str) -> list[_Cue]:
        found: list[_Cue] = []
        for pattern, effect, direction, window in self._cue_rules:
            for match in pattern.finditer(text):
                found.append(_Cue(match.start(), match.end(), effect, direction, window))
        # Longest cue wins where cues overlap ("cannot be excluded" over "not", "no change" over "no"); the sort is
        # stable, so between cues of the same span the earlier rule wins.
        found.sort(key=lambda cue: (cue.start, -(cue.end - cue.start)))
        kept: list[_Cue] = []
        last_end = -1
        for cue in found:
            if cue.start >= last_end:
                kept.append(cue)
                last_end = cue.end
        return [cue for cue in kept if cue.effect != "pseudo"]

    def _find_phrases(self, text: str) -> list[tuple[tuple[str, ...], int, int, int | None]]:
        found = []
        for rank, (observations, pattern, fixed_state) in enumerate(self._mention_rules):
            for match in pattern.finditer(text):
                found.append(
                    (match.start(), -(match.end() - match.start()), rank, observations, match.end(), fixed_state)
                )
        found.sort(key=lambda item: item[:3])
        kept = []
        last_end = -1
        for start, _, _, observations, end, fixed_state in found:
            if start >= last_end:
                kept.append((observations, start, end, fixed_state))
                last_end = end
        return kept

    def extract_mentions(self, text: str) -> list[Mention]:
        """Find every phrase of a report and decide whether it is positive, negated or uncertain.

        Args:
            text (`str`):
                A report (any case; IU X-Ray "XXXX" tokens allowed).

        Returns:
            `list[Mention]`: The mentions in reading order, with offsets into `CheXpertRuleLabeler.normalize(text)`.
        """
        text = self.normalize(text)
        if not text:
            return []
        breaks = self._sentence_breaks(text)
        cues_by_sentence: dict[int, list[_Cue]] = {}
        terminator_starts: list[int] = []
        for cue in self._find_cues(text):
            if cue.effect == "terminator":
                terminator_starts.append(cue.start)
            else:
                cues_by_sentence.setdefault(bisect.bisect_right(breaks, cue.start), []).append(cue)
        mentions: list[Mention] = []
        for observations, start, end, fixed_state in self._find_phrases(text):
            if fixed_state is not None:
                state, cue_text = fixed_state, ""
            else:
                sentence_cues = cues_by_sentence.get(bisect.bisect_right(breaks, start), [])
                state, cue_text = self._decide_state(text, start, end, sentence_cues, terminator_starts)
            mentions.append(Mention(observations, text[start:end], start, end, state, cue_text))
        return mentions

    @staticmethod
    def _decide_state(
        text: str, start: int, end: int, sentence_cues: list[_Cue], terminator_starts: list[int]
    ) -> tuple[int, str]:
        """State of the phrase `text[start:end]` given the cues of its sentence, and the text of the deciding cue."""

        def terminated(left: int, right: int) -> bool:
            index = bisect.bisect_left(terminator_starts, left)
            return index < len(terminator_starts) and terminator_starts[index] < right

        def words_between(left: int, right: int) -> int:
            return len(_WORD.findall(text[left:right]))

        before: _Cue | None = None
        after: _Cue | None = None
        for cue in sentence_cues:
            if cue.end <= end:
                # A cue before the phrase, or inside it ("heart is not enlarged"): the nearest one decides.
                if cue.direction not in ("before", "hedge", "both"):
                    continue
                if cue.end <= start:
                    if terminated(cue.end, start):
                        continue
                    if cue.window is not None and words_between(cue.end, start) > cue.window:
                        continue
                if cue.direction == "hedge" and before is not None and before.effect in (NEGATIVE, NOT_MENTIONED):
                    continue  # "no opacity to suggest pneumonia", "if concern for fracture": the earlier cue governs
                before = cue
            elif cue.start >= end and after is None:
                if cue.direction not in ("after", "both"):
                    continue
                if words_between(end, cue.start) > cue.window or terminated(end, cue.start):
                    continue
                after = cue
        if before is not None and before.effect == NOT_MENTIONED:
            return NOT_MENTIONED, text[before.start : before.end]
        if after is not None and after.effect == UNCERTAIN:
            return UNCERTAIN, text[after.start : after.end]
        if before is not None and before.effect == NEGATIVE:
            return NEGATIVE, text[before.start : before.end]
        if after is not None:
            return NEGATIVE, text[after.start : after.end]
        if before is not None:
            return UNCERTAIN, text[before.start : before.end]
        return POSITIVE, ""

    def label(self, text: str) -> list[int]:
        """Label one report.

        Args:
            text (`str`):
                The report (for IU X-Ray, findings and impression joined).

        Returns:
            `list[int]`: 14 states (`POSITIVE`, `NEGATIVE`, `UNCERTAIN`, `NOT_MENTIONED`) in `CHEXPERT_OBSERVATIONS`
            order. The rules are English: a report with letters but none of the Latin alphabet (after NFKC folding)
            is all NOT_MENTIONED, "No Finding" included. A report without words (empty, or only punctuation) has
            "No Finding" POSITIVE and everything else NOT_MENTIONED.
        """
        folded = unicodedata.normalize("NFKC", _check_text(text, "text")).lower()
        if _ANY_LETTER.search(folded) and not _LATIN_LETTER.search(folded):
            return [NOT_MENTIONED] * len(CHEXPERT_OBSERVATIONS)
        by_observation: dict[str, int] = {}
        for mention in self.extract_mentions(text):
            for observation in mention.observations:
                by_observation[observation] = _combine(by_observation.get(observation, NOT_MENTIONED), mention.state)
        if self.propagate_to_lung_opacity:
            for child in LUNG_OPACITY_CHILDREN:
                child_state = by_observation.get(child, NOT_MENTIONED)
                if child_state in (POSITIVE, UNCERTAIN):
                    by_observation["Lung Opacity"] = _combine(
                        by_observation.get("Lung Opacity", NOT_MENTIONED), child_state
                    )
        blocking = PATHOLOGY_OBSERVATIONS + ((OTHER_FINDING,) if self.no_finding_rule == "strict" else ())
        has_finding = any(by_observation.get(name, NOT_MENTIONED) in (POSITIVE, UNCERTAIN) for name in blocking)
        by_observation[NO_FINDING] = NOT_MENTIONED if has_finding else POSITIVE
        return [by_observation.get(name, NOT_MENTIONED) for name in CHEXPERT_OBSERVATIONS]

    __call__ = label

    def label_many(self, texts: Iterable[str]) -> list[list[int]]:
        """Label several reports; see `CheXpertRuleLabeler.label`."""
        if isinstance(texts, (str, bytes, bytearray, Mapping)) or not isinstance(texts, Iterable):
            raise TypeError(
                f"texts must be an iterable of reports (a list of str), got {type(texts).__name__}; use "
                "label_report for one report or wrap it in a list."
            )
        return [self.label(_check_text(text, f"texts[{index}]")) for index, text in enumerate(texts)]


def _check_text(text: object, name: str) -> str:
    """`text` itself if it is a `str`, otherwise a `TypeError` that names the argument."""
    if not isinstance(text, str):
        hint = " (decode bytes first, e.g. text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{name} must be a report as a str, got {type(text).__name__}{hint}.")
    return text


_STATE_PRIORITY = {NOT_MENTIONED: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}


def _combine(current: int, new: int) -> int:
    """Aggregate mention states: POSITIVE beats UNCERTAIN beats NEGATIVE beats NOT_MENTIONED."""
    return new if _STATE_PRIORITY[new] > _STATE_PRIORITY[current] else current


_DEFAULT_LABELER: CheXpertRuleLabeler | None = None


def _default_labeler() -> CheXpertRuleLabeler:
    global _DEFAULT_LABELER
    if _DEFAULT_LABELER is None:
        _DEFAULT_LABELER = CheXpertRuleLabeler()
    return _DEFAULT_LABELER


def label_report(text: str) -> list[int]:
    """Label one report with the default `CheXpertRuleLabeler`: 14 states in `CHEXPERT_OBSERVATIONS` order."""
    return _default_labeler().label(text)


def label_reports(texts: Iterable[str]) -> list[list[int]]:
    """Label several reports with the default `CheXpertRuleLabeler`."""
    return _default_labeler().label_many(texts)


def to_binary(states: Sequence[int], uncertain_as: int = 1) -> list[int]:
    """Map four-state labels to 0/1 targets for metrics or a binary cross-entropy loss.

    POSITIVE becomes 1, NEGATIVE and NOT_MENTIONED become 0, UNCERTAIN becomes `uncertain_as` (1 is CheXpert's
    "U-Ones" policy, 0 its "U-Zeros" policy). MIMIC-CXR's ``chexpert.csv`` values 1.0/0.0/-1.0/blank should first be
    read as POSITIVE/NEGATIVE/UNCERTAIN/NOT_MENTIONED.

    Args:
        states (`Sequence[int]`):
            States of one report (for example the output of `label_report`).
        uncertain_as (`int`, *optional*, defaults to 1):
            The binary value given to UNCERTAIN (0 or 1).

    Returns:
        `list[int]`: One 0/1 value per state.
    """
    if uncertain_as not in (0, 1):
        raise ValueError(f"uncertain_as must be 0 or 1, got {uncertain_as}")
    binary = []
    for state in states:
        if state == POSITIVE:
            binary.append(1)
        elif state == UNCERTAIN:
            binary.append(uncertain_as)
        elif state in (NEGATIVE, NOT_MENTIONED):
            binary.append(0)
        else:
            raise ValueError(f"unknown label state {state}")
    return binary


__all__ = [
    "CHEXPERT_OBSERVATIONS",
    "EVALUATION_OBSERVATIONS",
    "HEDGE_CUES",
    "LUNG_OPACITY_CHILDREN",
    "MAX_SENTENCE_WORDS",
    "MENTION_PHRASES",
    "NEGATION_CUES",
    "NEGATIVE",
    "NORMAL_STATEMENTS",
    "NOT_MENTIONED",
    "OTHER_FINDING",
    "OTHER_FINDING_PHRASES",
    "PATHOLOGY_OBSERVATIONS",
    "POSITIVE",
    "POST_NEGATION_CUES",
    "POST_UNCERTAINTY_CUES",
    "PSEUDO_NEGATIONS",
    "SCOPE_TERMINATORS",
    "SHARED_MENTION_PHRASES",
    "UNCERTAIN",
    "UNCERTAINTY_CUES",
    "CheXpertRuleLabeler",
    "Mention",
    "label_report",
    "label_reports",
    "to_binary",
]
